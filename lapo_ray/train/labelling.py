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
import pyarrow.parquet as pq
import torch

from lapo_ray import storage
from lapo_ray.config import LabelConfig, ModelConfig, PipelineConfig, config_from_dict
from lapo_ray.data.sources import Source
from lapo_ray.data.triplets import triplet_dataset
from lapo_ray.models import LatentDynamics
from lapo_ray.train.checkpoint import load_checkpoint, read_checkpoint_config

LATENTS_DIR = "latents"


def load_dynamics(checkpoint_dir: str) -> LatentDynamics:
    """Rebuild the stage-1 model from a checkpoint folder alone (its config travels with it)."""
    model_cfg = config_from_dict(ModelConfig, read_checkpoint_config(checkpoint_dir)["model"])
    model = LatentDynamics(model_cfg)
    load_checkpoint(checkpoint_dir, model)
    return model.eval()


class IDMLabeller:
    """Ray Data actor: frames triplets in, latent actions out."""

    def __init__(self, checkpoint_uri: str):
        import ray.train

        fs, path = storage.resolve(checkpoint_uri)
        ckpt = ray.train.Checkpoint(path, filesystem=fs)
        with ckpt.as_directory() as d:
            self.model = load_dynamics(d)
        torch.set_num_threads(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = torch.from_numpy(batch["frames"])
        latent, codes = self.model.encode(frames)
        return {
            "episode_id": batch["episode_id"],
            "step": batch["step"],
            "obs": batch["frames"][:, 1],
            "latent": latent.float().numpy(),
            "codes": codes.reshape(len(frames), -1).numpy(),
            "action": batch["action"],
        }


def label_corpus(source: Source, checkpoint_uri: str, out_uri: str, cfg: LabelConfig,
                 pipe: PipelineConfig) -> dict[str, Any]:
    """Write the latent action of every triplet centre of ``source`` to ``<out_uri>/latents``."""
    import ray.data

    dest = storage.join(out_uri, LATENTS_DIR)
    manifest_uri = storage.join(dest, "manifest.json")
    if storage.exists(manifest_uri):
        return storage.read_json(manifest_uri)
    started = time.monotonic()
    # A partial folder from an interrupted run is replaced whole: labelling is deterministic.
    fs, path = storage.resolve(dest)
    if storage.exists(dest):
        fs.delete_dir(path)
    ordered = PipelineConfig(global_shuffle="none", local_shuffle_buffer=0,
                             segments_per_block=pipe.segments_per_block, expand_num_cpus=pipe.expand_num_cpus)
    ds = triplet_dataset(source, "all", ordered).map_batches(
        IDMLabeller,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri},
        batch_size=cfg.batch_size,
        batch_format="numpy",
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


def latents_dataset(out_uri: str, split: str, pipe: PipelineConfig):
    """Stage 2's input: the labelled steps of one split (split by episode, as for stage 1)."""
    import ray.data

    from lapo_ray.data.triplets import SplitSpec

    dest = storage.join(out_uri, LATENTS_DIR)
    if not storage.exists(storage.join(dest, "manifest.json")):
        raise FileNotFoundError(f"{dest}: no finished latent labels (run the 'label' stage first)")
    fs, path = storage.resolve(dest)
    spec = SplitSpec(pipe.val_fraction, pipe.split_seed)

    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = spec.keep(batch["episode_id"], split)
        return {k: v[mask] for k, v in batch.items()}

    ds = ray.data.read_parquet(path, filesystem=fs)
    if pipe.global_shuffle != "none":
        ds = ds.randomize_block_order(seed=pipe.shuffle_seed)
    return ds.map_batches(keep, batch_format="numpy", num_cpus=pipe.expand_num_cpus)
