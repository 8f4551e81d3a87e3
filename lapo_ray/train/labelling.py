"""Latent labelling: the trained IDM's latent action for every step of the corpus.

Batch inference on a Ray Data actor pool (each actor loads the IDM once): one task per input
file, which the actor reads itself and labels into one output shard of the same name under
``<artifacts>/latents/``, written atomically (a hidden temporary file, renamed when complete).
Per step t the shard holds ``episode_id``, ``step``, ``obs`` (o[t], uint8 H x W x C),
``latent`` (the continuous, pre-quantisation latent action that stage 2 imitates), ``codes``
(the VQ code indices) and ``action`` (true action or -1, evaluation only). Storing o[t] beside
its label makes stage 2 a plain streaming read with no join.

A run that is stopped keeps its finished shards: run again with the same checkpoint and files
(``labelling.json`` records them), it labels only the files whose shard is missing.
``latents/manifest.json`` is written last; readers refuse a folder without it. A finished folder
is kept as it is when asked again for the same checkpoint and files, and relabelled from scratch
for any other.

Pretraining's ``label`` stage calls ``label_corpus``; ``jobs/label.py`` calls it through
``pipelines.label.run_label`` for any corpus and any trained stage-1 checkpoint. Actors given GPUs
(``--label.num-gpus-per-actor``, fractions share one) run the IDM on CUDA.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lapo_ray import MissingPathError, UsageError, storage, telemetry
from lapo_ray.progress import Progress
from lapo_ray.config import LabelConfig, PipelineConfig
from lapo_ray.data.sources import Source
from lapo_ray.data.triplets import SplitSpec, TripletBatcher, iter_segments
from lapo_ray.runtime import check_cpu_budget
from lapo_ray.train.checkpoint import load_dynamics

LATENTS_DIR = "latents"
RUN_FILE = "labelling.json"
COLUMNS = ["episode_id", "step", "obs", "latent", "codes", "action"]


def shard_name(source: Source, file_uri: str) -> str:
    """The output shard of one input file: its name as its source gives it (``Source.file_stem``),
    as Parquet (a corpus shard keeps its own)."""
    name = source.file_stem(file_uri)
    return name if name.endswith(".parquet") else f"{name}.parquet"


class IDMLabeller:
    """Ray Data actor: paths of input files in; for each, its labelled shard written, its row count out."""

    def __init__(self, checkpoint_uri: str, source: Source, dest_uri: str, batch_size: int = 256,
                 use_gpu: bool = False, threads: int = 1):
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("labelling actor: GPUs were reserved (--label.num-gpus-per-actor) but torch sees no "
                               "CUDA device")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = load_dynamics(checkpoint_uri).to(self.device)
        self.source, self.dest, self.batch_size = source, dest_uri, batch_size
        model_cfg = self.model.cfg
        self.shape = (model_cfg.frame_size, model_cfg.frame_size, model_cfg.channels)
        torch.set_num_threads(max(1, threads))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths, rows, seconds = [], [], []
        for path in batch["path"]:
            t0 = time.monotonic()
            rows.append(self.label_file(str(path)))
            paths.append(str(path))
            seconds.append(time.monotonic() - t0)
        return {"path": np.array(paths), "rows": np.array(rows, np.int64), "seconds": np.array(seconds)}

    def label_file(self, path: str) -> int:
        """Label every triplet centre of ``path`` into its shard; a row group at a time, so the
        actor never holds more than one of the input's row groups."""
        n, writer = 0, None
        with storage.atomic_output(storage.join(self.dest, shard_name(self.source, path))) as out:
            for table in self.source.file_segments(path):
                batcher = TripletBatcher(self.shape, self.batch_size, offset=self.model.cfg.frame_offset)
                for b in batcher.batches(iter_segments(table, self.shape)):
                    block = self.label(b)
                    writer = writer or pq.ParquetWriter(out, block.schema)
                    writer.write_table(block)
                    n += block.num_rows
            if writer is None:  # no triplet in the file: an empty shard still says it was done
                empty = self._empty()
                writer = pq.ParquetWriter(out, empty.schema)
                writer.write_table(empty)
            writer.close()
        return n

    @torch.no_grad()
    def label(self, batch: dict[str, np.ndarray]) -> pa.Table:
        # lazy: jobs import this before they check their input (architecture.md, Imports)
        from ray.data.block import BlockAccessor

        frames = torch.from_numpy(batch["frames"]).to(self.device, non_blocking=True)
        latent, codes = (t.cpu() for t in self.model.encode(frames))
        telemetry.count("labelled_frames", len(latent))
        # Ray Data's own block layout (tensor columns with their shapes), so stage 2's
        # read_parquet gets arrays back.
        return BlockAccessor.batch_to_block({
            "episode_id": batch["episode_id"],
            "step": batch["step"],
            "obs": np.ascontiguousarray(batch["frames"][:, 1]),
            "latent": latent.float().numpy(),
            "codes": codes.reshape(len(latent), -1).numpy(),
            "action": batch["action"],
        })

    def _empty(self) -> pa.Table:
        # lazy: jobs import this before they check their input (architecture.md, Imports)
        from ray.data.block import BlockAccessor

        model_cfg = self.model.cfg
        codes = model_cfg.vq.num_codebooks * model_cfg.vq.num_discrete_latents
        one = {"episode_id": np.zeros(1, np.int64), "step": np.zeros(1, np.int64),
               "obs": np.zeros((1, *self.shape), np.uint8), "latent": np.zeros((1, model_cfg.latent_dim), np.float32),
               "codes": np.zeros((1, codes), np.int64), "action": np.zeros(1, np.int64)}
        return BlockAccessor.batch_to_block(one).slice(0, 0)


def _finished_shards(dest: str) -> dict[str, str]:
    """name -> path of the complete shards in ``dest``; leftovers of an interrupted writer (hidden
    temporary files) are deleted."""
    fs, _ = storage.resolve(dest)
    done = {}
    for path in storage.list_files(dest):
        name = posixpath.basename(path)
        if name.startswith(".") and ".tmp-" in name:
            fs.delete_file(path)
        elif name.endswith(".parquet"):
            done[name] = path
    return done


def check_gpu_budget(cfg: LabelConfig) -> None:
    """Fail at once when the actors' GPUs exceed the cluster's (Ray would wait without a word);
    clusters that grow on demand (LAPO_AUTOSCALING=1) are left out, as for CPUs."""
    import ray  # lazy: jobs import this before they check their input (architecture.md, Imports)

    if cfg.num_gpus_per_actor <= 0 or os.environ.get("LAPO_AUTOSCALING") == "1":
        return
    total = float(ray.cluster_resources().get("GPU", 0.0))
    need = cfg.num_actors * cfg.num_gpus_per_actor
    if need > total + 1e-9:
        raise UsageError(f"labelling: {cfg.num_actors} actors x {cfg.num_gpus_per_actor:g} GPUs is {need:g} GPUs, "
                         f"but the cluster has {total:g}; lower --label.num-gpus-per-actor (fractions share a "
                         "GPU) or --label.num-actors, or 0 GPUs to label on CPUs")


def label_corpus(source: Source, checkpoint_uri: str, out_uri: str, cfg: LabelConfig,
                 files: list[str] | None = None, file_triplets: list[int] | None = None) -> dict[str, Any]:
    """Write the latent action of every triplet centre of ``source`` (or of its ``files``) to
    ``<out_uri>/latents``, one shard per file; shards finished by an earlier run with the same
    checkpoint and files are kept. Each actor reads its files itself, in order. With
    ``file_triplets`` (the scan's count per file, aligned with ``files``) progress lines count
    steps, with rate and ETA; without, shards."""
    dest = storage.join(out_uri, LATENTS_DIR)
    manifest_uri = storage.join(dest, "manifest.json")
    files = list(files or source.scan_files())
    names = [shard_name(source, f) for f in files]
    run = {"checkpoint": checkpoint_uri, "source": source.name, "shards": names}
    run_uri = storage.join(dest, RUN_FILE)
    if storage.exists(manifest_uri) and storage.exists(run_uri) and storage.read_json(run_uri) == run:
        return storage.read_json(manifest_uri)
    check_cpu_budget("labelling", cfg.num_actors, cfg.cpus_per_actor,
                     "lower --label.num-actors or --label.cpus-per-actor (fractions work), or add CPUs")
    check_gpu_budget(cfg)
    started = time.monotonic()
    _start_run(source.name, dest, run_uri, run, names)
    done = _finished_shards(dest)
    todo = [f for f, n in zip(files, names) if n not in done]
    kept = len(files) - len(todo)
    if kept:
        print(f"labelling: {kept} of {len(files)} shards already finished in {dest}; labelling the other "
              f"{len(todo)}", flush=True)
    if todo:
        _label_files(source, checkpoint_uri, dest, cfg, files, todo, file_triplets)
    manifest = {"checkpoint": checkpoint_uri, "source": source.name, "rows": _count_rows(dest, names),
                "shards": len(names), "shards_kept_from_earlier_run": kept,
                "seconds": round(time.monotonic() - started, 1), "columns": COLUMNS}
    storage.write_json(manifest_uri, manifest)
    return manifest


def _start_run(source_name: str, dest: str, run_uri: str, run: dict[str, Any], names: list[str]) -> None:
    """Refuse input files that would share a shard name, clear ``dest`` of another run's labels
    and record this run there."""
    clashes = sorted(n for n, k in Counter(names).items() if k > 1)
    if clashes:
        raise UsageError(f"{source_name}: input files would share the latent shard name(s) {', '.join(clashes[:5])}; "
                         "rename them so each file name is unique")
    fs, path = storage.resolve(dest)
    if storage.exists(dest) and not (storage.exists(run_uri) and storage.read_json(run_uri) == run):
        # Labels of another checkpoint or another set of files must not mix with these.
        print(f"labelling: {dest} holds labels of another run; starting over", flush=True)
        fs.delete_dir(path)
    storage.makedirs(dest)
    storage.write_json(run_uri, run)


def _label_files(source: Source, checkpoint_uri: str, dest: str, cfg: LabelConfig, files: list[str],
                 todo: list[str], file_triplets: list[int] | None) -> None:
    """Label the files ``todo`` (of ``files``) on a pool of ``IDMLabeller`` actors, a task per
    file, with a progress line per finished shard."""
    import ray.data  # lazy: jobs import this before they check their input (architecture.md, Imports)

    use_gpu = cfg.num_gpus_per_actor > 0
    ds = ray.data.from_items([{"path": f} for f in todo]).map_batches(
        IDMLabeller,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "source": source, "dest_uri": dest,
                               "batch_size": cfg.batch_size, "use_gpu": use_gpu,
                               "threads": int(cfg.cpus_per_actor)},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.num_actors, len(todo)))),
        num_cpus=cfg.cpus_per_actor,
        **({"num_gpus": cfg.num_gpus_per_actor} if use_gpu else {}),
    )
    counts = dict(zip(files, file_triplets)) if file_triplets is not None and len(file_triplets) == len(files) \
        else None
    # Rate and ETA over the steps still to label (the scan's counts), else over shards.
    progress = (Progress(sum(counts[f] for f in todo), "labelling", "steps", interval=0) if counts
                else Progress(len(todo), "labelling", "shards", interval=0))
    kept = len(files) - len(todo)
    for i, r in enumerate(ds.iter_rows()):
        progress.update(int(r["rows"]) if counts else 1,
                        extra=f"shard {kept + i + 1}/{len(files)} {shard_name(source, str(r['path']))}: "
                              f"{int(r['rows'])} steps in {float(r['seconds']):.1f}s")


def _count_rows(dest: str, names: list[str]) -> int:
    """The rows of the shards ``names`` in ``dest``, every one of which must be there."""
    done = _finished_shards(dest)
    missing = [n for n in names if n not in done]
    if missing:
        raise RuntimeError(f"labelling: {len(missing)} shard(s) missing in {dest} after the run: {', '.join(missing[:5])}")
    fs, _ = storage.resolve(dest)
    rows = 0
    for n in names:
        with fs.open_input_file(done[n]) as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    return rows


SPLIT_FILE = "split.json"


def latents_dataset(out_uri: str, split: str, pipe: PipelineConfig):
    """Stage 2's input: the labelled steps of one split (split by episode, as for stage 1)."""
    import ray.data  # lazy: jobs import this before they check their input (architecture.md, Imports)

    dest = storage.join(out_uri, LATENTS_DIR)
    if not storage.exists(storage.join(dest, "manifest.json")):
        raise MissingPathError(f"{dest}: no finished latent labels (run the 'label' stage first)")
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
