"""Latent labelling: the trained IDM's latent action for every step of the corpus.

Batch inference through Ray Data ``map_batches`` on an actor pool (each actor loads the IDM once).
The output is Parquet under ``<artifacts>/latents/``: per step t, ``episode_id``, ``step``,
``obs`` (o[t], uint8 H x W x C), ``latent`` (the continuous, pre-quantisation latent action that
stage 2 imitates), ``codes`` (the VQ code indices) and ``action`` (true action or -1, evaluation
only). Storing o[t] beside its label makes stage 2 a plain streaming read with no join.
``latents/manifest.json`` is written last; readers refuse a folder without it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lapo_ray import storage, telemetry
from lapo_ray.config import LabelConfig, PipelineConfig
from lapo_ray.data.sources import Source
from lapo_ray.data.triplets import TripletBatcher, iter_segments, triplet_dataset
from lapo_ray.runtime import check_cpu_budget
from lapo_ray.train.checkpoint import load_dynamics

LATENTS_DIR = "latents"


class IDMLabeller:
    """Ray Data actor: episode segments in, the latent action of every triplet centre out."""

    def __init__(self, checkpoint_uri: str, batch_size: int = 256):
        self.model = load_dynamics(checkpoint_uri)
        self.batch_size = batch_size
        torch.set_num_threads(1)

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        c = self.model.cfg
        shape = (c.frame_size, c.frame_size, c.channels)
        parts = []
        batcher = TripletBatcher(shape, self.batch_size, offset=c.frame_offset)
        for batch in batcher.batches(iter_segments(table, shape)):
            latent, codes = self.model.encode(torch.from_numpy(batch["frames"]))
            parts.append({
                "episode_id": batch["episode_id"],
                "step": batch["step"],
                "obs": batch["frames"][:, 1],
                "latent": latent.float().numpy(),
                "codes": codes.reshape(len(latent), -1).numpy(),
                "action": batch["action"],
            })
            telemetry.count("labelled_frames", len(latent))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else self._empty(shape)

    def _empty(self, shape) -> pa.Table:
        # A zero-row block must still carry the tensor column types (see triplets.py).
        from ray.data.block import BlockAccessor

        one = {"episode_id": np.zeros(1, np.int64), "step": np.zeros(1, np.int64),
               "obs": np.zeros((1, *shape), np.uint8), "latent": np.zeros((1, self.model.cfg.latent_dim), np.float32),
               "codes": np.zeros((1, self.model.cfg.vq.num_codebooks * self.model.cfg.vq.num_discrete_latents), np.int64),
               "action": np.zeros(1, np.int64)}
        return BlockAccessor.batch_to_block(one).slice(0, 0)


def label_corpus(source: Source, checkpoint_uri: str, out_uri: str, cfg: LabelConfig,
                 pipe: PipelineConfig) -> dict[str, Any]:
    """Write the latent action of every triplet centre of ``source`` to ``<out_uri>/latents``."""
    import ray.data

    dest = storage.join(out_uri, LATENTS_DIR)
    manifest_uri = storage.join(dest, "manifest.json")
    if storage.exists(manifest_uri):
        return storage.read_json(manifest_uri)
    check_cpu_budget("labelling", cfg.num_actors, cfg.cpus_per_actor,
                     "lower --label.num-actors or --label.cpus-per-actor (fractions work), or add CPUs")
    started = time.monotonic()
    # A partial folder from an interrupted run is replaced whole: labelling is deterministic.
    fs, path = storage.resolve(dest)
    if storage.exists(dest):
        fs.delete_dir(path)
    ordered = PipelineConfig(global_shuffle="none", local_shuffle_buffer=0,
                             segments_per_block=pipe.segments_per_block, expand_num_cpus=pipe.expand_num_cpus)
    ds = triplet_dataset(source, "all", ordered).map_batches(
        IDMLabeller,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "batch_size": cfg.batch_size},
        batch_size=pipe.segments_per_block,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor,
    )
    ds.write_parquet(path, filesystem=fs)
    rows = 0
    for f in storage.list_files(dest, suffix=".parquet"):
        with fs.open_input_file(f) as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    manifest = {"checkpoint": checkpoint_uri, "source": source.name, "rows": rows,
                "seconds": round(time.monotonic() - started, 1),
                "columns": ["episode_id", "step", "obs", "latent", "codes", "action"]}
    storage.write_json(manifest_uri, manifest)
    return manifest


SPLIT_FILE = "split.json"


def latents_dataset(out_uri: str, split: str, pipe: PipelineConfig):
    """Stage 2's input: the labelled steps of one split (split by episode, as for stage 1)."""
    import ray.data

    from lapo_ray.data.triplets import SplitSpec

    dest = storage.join(out_uri, LATENTS_DIR)
    if not storage.exists(storage.join(dest, "manifest.json")):
        raise FileNotFoundError(f"{dest}: no finished latent labels (run the 'label' stage first)")
    fs, path = storage.resolve(dest)
    # Stage 2 validates on the very episodes stage 1 validated on: the split pretraining wrote.
    split_uri = storage.join(out_uri, SPLIT_FILE)
    spec = (SplitSpec.from_dict(storage.read_json(split_uri)) if storage.exists(split_uri)
            else SplitSpec(pipe.val_fraction, pipe.split_seed))

    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = spec.keep(batch["episode_id"], split)
        return {k: v[mask] for k, v in batch.items()}

    ds = ray.data.read_parquet(path, filesystem=fs)
    if pipe.global_shuffle != "none":
        ds = ds.randomize_block_order(seed=pipe.shuffle_seed)
    return ds.map_batches(keep, batch_format="numpy", num_cpus=pipe.expand_num_cpus)
