"""From episode segments to batches of frame triplets (o[t-1], o[t], o[t+1]).

The batch contract (see docs/architecture.md): ``frames`` uint8 (B, 3, H, W, C), ``episode_id``
int64 (B,), ``step`` int64 (B,) = t within the episode, and ``action`` int64 (B,) = the action
taken at o[t] (that led to o[t+1]) where the source has actions, -1 otherwise. Only evaluation
reads ``action``.

Two consumers share ``segment_triplets``: the Ray Data pipeline (``triplet_dataset``) that feeds
Ray Train workers, and a plain single-process reader (``iter_plain_batches``) used for probes
and as the benchmark reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa

from lapo_ray.config.data import PipelineConfig
from lapo_ray.data.corpus import decode_frames
from lapo_ray.data.sources import Source

Split = Literal["train", "val", "all"]


@dataclass(frozen=True)
class SplitSpec:
    """Assigns whole episodes to train or validation by a seeded hash of the episode id."""

    val_fraction: float = 0.05
    seed: int = 0

    def is_val(self, episode_ids: np.ndarray) -> np.ndarray:
        return (self.episode_hash(episode_ids) % np.uint64(1_000_000)) < np.uint64(round(self.val_fraction * 1_000_000))

    def episode_hash(self, episode_ids: np.ndarray) -> np.ndarray:
        # splitmix64: a fixed, well-mixed hash, so the split is stable across runs and machines.
        with np.errstate(over="ignore"):
            x = np.asarray(episode_ids, dtype=np.uint64) + np.uint64(self.seed) * np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return x ^ (x >> np.uint64(31))

    def keep(self, episode_ids: np.ndarray, split: Split) -> np.ndarray:
        if split == "all":
            return np.ones(len(episode_ids), bool)
        val = self.is_val(episode_ids)
        return val if split == "val" else ~val


def segment_triplets(
    frames: np.ndarray, episode_id: int, start: int, actions: Any | None
) -> dict[str, np.ndarray]:
    """All triplets of one segment. ``frames`` is (L, H, W, C); returns L - 2 triplets."""
    n = len(frames) - 2
    if n <= 0:
        return {}
    # sliding_window_view is a view; the copy happens once, into the contiguous batch.
    windows = np.lib.stride_tricks.sliding_window_view(frames, 3, axis=0)  # (n, H, W, C, 3)
    out = {
        "frames": np.ascontiguousarray(np.moveaxis(windows, -1, 1)),
        "episode_id": np.full(n, episode_id, np.int64),
        "step": np.arange(start + 1, start + 1 + n, dtype=np.int64),
    }
    out["action"] = (
        np.asarray(actions[1 : n + 1], dtype=np.int64) if actions is not None else np.full(n, -1, np.int64)
    )
    return out


def _concat(parts: list[dict[str, np.ndarray]], frame_shape) -> dict[str, np.ndarray]:
    parts = [p for p in parts if p]
    if not parts:
        return {
            "frames": np.zeros((0, 3, *frame_shape), np.uint8),
            "episode_id": np.zeros(0, np.int64),
            "step": np.zeros(0, np.int64),
            "action": np.zeros(0, np.int64),
        }
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def iter_segment_triplets(
    table: pa.Table, frame_shape: tuple[int, ...], split: Split, split_spec: SplitSpec
) -> Iterator[dict[str, np.ndarray]]:
    """The triplets of each segment of ``table`` that belongs to ``split``, one segment at a time."""
    ids = table.column("episode_id").to_numpy()
    keep = split_spec.keep(ids, split)
    if not keep.any():
        return
    starts = table.column("start").to_numpy()
    counts = table.column("num_frames").to_numpy()
    blobs = table.column("frames")
    actions = table.column("actions") if "actions" in table.column_names else None
    for i in np.flatnonzero(keep):
        # as_buffer() is a view of the Arrow memory: no copy until the triplets are built.
        frames = decode_frames(blobs[i].as_buffer(), int(counts[i]), frame_shape)
        acts = actions[i].values.to_numpy(zero_copy_only=False) if actions is not None and actions[i].is_valid else None
        part = segment_triplets(frames, int(ids[i]), int(starts[i]), acts)
        if part:
            yield part


def segments_to_triplets(
    table: pa.Table, frame_shape: tuple[int, ...], split: Split, split_spec: SplitSpec
):
    """Keep one split's segments of a block and expand them to triplets (a map_batches fn)."""
    out = _concat(list(iter_segment_triplets(table, frame_shape, split, split_spec)), frame_shape)
    if len(out["step"]) == 0:
        # Ray Data cannot infer a tensor column type from zero rows and would fall back to
        # pickled objects for the whole column; a one-row block sliced to zero keeps the type.
        from ray.data.block import BlockAccessor

        one = segment_triplets(np.zeros((3, *frame_shape), np.uint8), 0, 0, None)
        return BlockAccessor.batch_to_block(one).slice(0, 0)
    return out


def rebatch(parts: Iterator[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Cut a stream of variable-size parts into batches of ``batch_size`` (the last may be short),
    copying each triplet once."""
    held: list[dict[str, np.ndarray]] = []
    n = 0
    for part in parts:
        length, start = len(part["step"]), 0
        while start < length:
            take = min(batch_size - n, length - start)
            held.append({k: v[start : start + take] for k, v in part.items()})
            n += take
            start += take
            if n == batch_size:
                yield {k: np.concatenate([h[k] for h in held]) for k in held[0]}
                held, n = [], 0
    if n:
        yield {k: np.concatenate([h[k] for h in held]) for k in held[0]}


def triplet_dataset(source: Source, split: Split, cfg: PipelineConfig, files: list[str] | None = None):
    """A streaming Ray Dataset of triplets for ``split`` (never materialised as a whole)."""
    ds = source.segments(files)
    # Streaming execution hands out blocks in completion order; keeping the plan's order makes
    # a seeded shuffle give the same sequence on every run (for one consumer; Ray Train's split
    # across workers still hands blocks to whichever worker asks first).
    ds.context.execution_options.preserve_order = True
    if cfg.global_shuffle == "files" or cfg.global_shuffle == "segments":
        ds = ds.randomize_block_order(seed=cfg.shuffle_seed)
    if cfg.global_shuffle == "segments":
        ds = ds.random_shuffle(seed=cfg.shuffle_seed)
    return ds.map_batches(
        segments_to_triplets,
        fn_kwargs={
            "frame_shape": tuple(source.frame_shape),
            "split": split,
            "split_spec": SplitSpec(cfg.val_fraction, cfg.split_seed),
        },
        batch_size=cfg.segments_per_block,
        batch_format="pyarrow",
        zero_copy_batch=True,
        num_cpus=cfg.expand_num_cpus,
    )


def torch_batches(ds, batch_size: int, cfg: PipelineConfig, drop_last: bool = False, epoch: int = 0):
    """Iterate torch batches from a triplet dataset or a Ray Train dataset shard."""
    buffer = cfg.local_shuffle_buffer or None
    return ds.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=(cfg.shuffle_seed + epoch) if buffer else None,
        device="cpu",
    )


def iter_plain_batches(
    source: Source, split: Split, batch_size: int, split_spec: SplitSpec = SplitSpec(),
    files: list[str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Single-process reader over a corpus (Parquet shards), no Ray: the reference loader."""
    import pyarrow.parquet as pq

    from lapo_ray import storage
    from lapo_ray.data.sources import CorpusSource

    if not isinstance(source, CorpusSource):
        raise TypeError("iter_plain_batches reads lapo_ray corpora; convert other sources first")
    shape = tuple(source.frame_shape)
    files = files or [storage.join(source.uri, s.path) for s in source.manifest.shards]

    def parts() -> Iterator[dict[str, np.ndarray]]:
        for uri in files:
            fs, path = storage.resolve(uri)
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                for rg in range(pf.num_row_groups):
                    yield from iter_segment_triplets(pf.read_row_group(rg), shape, split, split_spec)

    return rebatch(parts(), batch_size)
