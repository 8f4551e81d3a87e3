"""From episode segments to batches of frame triplets (o[t-1], o[t], o[t+1]).

The batch contract (see docs/architecture.md): ``frames`` uint8 (B, 3, H, W, C), ``episode_id``
int64 (B,), ``step`` int64 (B,) = t within the episode, and ``action`` int64 (B,) = the action
taken at o[t] (that led to o[t+1]) where the source has actions, -1 otherwise. Only evaluation
reads ``action``.

Ray Data streams *episode segments* (each frame once), globally shuffled and split across Ray
Train workers; each consumer cuts its segments into triplets itself (``TripletBatcher``), with a
seeded local shuffle over triplets. Cutting triplets inside Ray Data instead would push every
frame through the object store three times (measured: docs/results/choices.md, with
``jobs/benchmark.py data``). The plain single-process reader (``iter_plain_batches``) uses the
same batcher on Parquet row groups read directly, and is the benchmark's reference.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from lapo_ray import storage, telemetry
from lapo_ray.config.data import PipelineConfig
from lapo_ray.data.corpus import decode_frames
from lapo_ray.data.sources import CorpusSource, Source
from lapo_ray.data.splits import Split, SplitSpec


@dataclass
class Segment:
    """Decoded frames of one segment; ``frames[i]`` is step ``start + i`` of its episode."""

    frames: np.ndarray
    episode_id: int
    start: int
    actions: np.ndarray | None


def iter_segments(table: pa.Table, frame_shape: tuple[int, ...]) -> Iterator[Segment]:
    """The segments of an Arrow table in ``corpus.SEGMENT_SCHEMA`` (frames are views, no copy)."""
    ids = table.column("episode_id").to_numpy()
    starts = table.column("start").to_numpy()
    counts = table.column("num_frames").to_numpy()
    blobs = table.column("frames")
    actions = table.column("actions") if "actions" in table.column_names else None
    for i in range(table.num_rows):
        acts = None
        if actions is not None and actions[i].is_valid:
            acts = actions[i].values.to_numpy(zero_copy_only=False)
        yield Segment(decode_frames(blobs[i].as_buffer(), int(counts[i]), frame_shape),
                      int(ids[i]), int(starts[i]), acts)


def select_split(table: pa.Table, split: Split, spec: SplitSpec) -> pa.Table:
    """Keep the segments of one split's episodes (a map_batches function; zero-copy filter)."""
    if split == "all":
        return table
    return table.filter(pa.array(spec.keep(table.column("episode_id").to_numpy(), split)))


class TripletBatcher:
    """Cuts a stream of segments into batches of triplets (o[t-d], o[t], o[t+d]), d = ``offset``.

    With ``buffer_size`` > 0 it holds at least that many candidate triplets and draws each batch
    at random from them (a seeded local shuffle); with 0 it emits triplets in stream order.
    Each triplet is copied once, straight into its batch. Triplets never span segments: segments
    overlap by two frames, so with d > 1 the 2d - 2 triplets around each boundary are left out.
    """

    def __init__(self, frame_shape: tuple[int, ...], batch_size: int, buffer_size: int = 0,
                 seed: int | None = 0, drop_last: bool = False, offset: int = 1):
        if offset < 1:
            raise ValueError(f"triplet frame offset must be at least 1, got {offset}")
        self.offset = offset
        self.frame_shape, self.batch_size = tuple(frame_shape), batch_size
        self.buffer_size, self.drop_last = buffer_size, drop_last
        self.rng = np.random.default_rng(seed)
        self.segments: dict[int, Segment] = {}
        self.remaining: dict[int, int] = {}  # triplets not yet emitted, per held segment
        self.pool_seg: list[int] = []
        self.pool_t: list[int] = []
        self._next_key = 0

    def add(self, seg: Segment) -> None:
        d = self.offset
        n = len(seg.frames) - 2 * d
        if n <= 0:
            return
        key = self._next_key
        self._next_key += 1
        self.segments[key], self.remaining[key] = seg, n
        self.pool_seg.extend([key] * n)
        self.pool_t.extend(range(d, n + d))

    def ready(self) -> bool:
        return len(self.pool_t) >= self.batch_size + self.buffer_size

    def _take(self, count: int) -> dict[str, np.ndarray]:
        if self.buffer_size > 0:
            picks = self.rng.choice(len(self.pool_t), size=count, replace=False)
            # Swap-remove the picks from the pool, highest index first so indices stay valid.
            chosen = []
            for i in sorted(picks.tolist(), reverse=True):
                chosen.append((self.pool_seg[i], self.pool_t[i]))
                self.pool_seg[i], self.pool_t[i] = self.pool_seg[-1], self.pool_t[-1]
                self.pool_seg.pop()
                self.pool_t.pop()
            self.rng.shuffle(chosen)
        else:
            chosen = list(zip(self.pool_seg[:count], self.pool_t[:count]))
            del self.pool_seg[:count], self.pool_t[:count]
        out = {
            "frames": np.empty((count, 3, *self.frame_shape), np.uint8),
            "episode_id": np.empty(count, np.int64),
            "step": np.empty(count, np.int64),
            "action": np.full(count, -1, np.int64),
        }
        d = self.offset
        for j, (key, t) in enumerate(chosen):
            seg = self.segments[key]
            out["frames"][j] = seg.frames[t - d : t + d + 1 : d]
            out["episode_id"][j] = seg.episode_id
            out["step"][j] = seg.start + t
            if seg.actions is not None:
                out["action"][j] = seg.actions[t]
            self.remaining[key] -= 1
            if self.remaining[key] == 0:
                del self.segments[key], self.remaining[key]
        return out

    def batches(self, segments: Iterable[Segment]) -> Iterator[dict[str, np.ndarray]]:
        for seg in segments:
            self.add(seg)
            while self.ready():
                yield self._take(self.batch_size)
        while len(self.pool_t) >= self.batch_size:
            yield self._take(self.batch_size)
        if self.pool_t and not self.drop_last:
            yield self._take(len(self.pool_t))


def triplet_dataset(source: Source, split: Split, cfg: PipelineConfig, files: list[str] | None = None,
                    spec: SplitSpec | None = None, weighted: bool = False):
    """A streaming Ray Dataset of the episode segments of ``split``. Iterate it (or a Ray Train
    shard of it) with ``torch_batches``/``iter_batches``, which cut the triplets.

    The source orders its files (``Source.stream_files``): a source of several corpora
    (``data.mixture.MultiSource``) interleaves its sources' files and, when ``weighted`` (the
    training streams), repeats them to its sources' weights; one source ignores ``weighted``.

    Global shuffling, seeded: ``files`` reads the files in a random order (streaming: the first
    batch arrives after one file is read); ``segments`` adds a full ``random_shuffle`` of the
    segments, which is exact but all-to-all (the whole split passes through the object store,
    spilling to disk, before the first batch). The local shuffle over triplets happens in the
    consumer.
    """
    spec = spec or SplitSpec(cfg.val_fraction, cfg.split_seed)
    seed = cfg.shuffle_seed if cfg.global_shuffle in ("files", "segments") else None
    ds = source.segments(source.stream_files(list(files or source.scan_files()), spec, split, seed, weighted))
    # Imported here: the batcher, splits and segment decoding above run without Ray (the probe
    # on a machine with PyTorch and pyarrow alone).
    from lapo_ray.data.pacing import pace_scheduling

    # The context travels with the dataset to Ray Train's SplitCoordinator and to every
    # worker's iterator, and so does the callback.
    pace_scheduling(ds.context, cfg.paced_scheduling)
    # Streaming execution hands out blocks in completion order; keeping the plan's order makes
    # a seeded shuffle give the same sequence on every run. Under Ray Train (train.trainer passes
    # these options on) the split then gives each worker the same blocks on every run, unless
    # shard locality routes blocks by the node they were read on.
    ds.context.execution_options.preserve_order = True
    if cfg.block_mb > 0:
        ds.context.target_max_block_size = int(cfg.block_mb * 2**20)
    if split != "all":
        # The CPU request of the read tasks (Ray Data's 1): Ray Data then fuses the filter into
        # them. As a task of its own (at 0.5 CPU) every block would cross the object store twice,
        # read and filtered, and spill twice as much (measured: docs/results/choices.md).
        ds = ds.map_batches(select_split, fn_kwargs={"split": split, "spec": spec},
                            batch_format="pyarrow", zero_copy_batch=True, num_cpus=1)
    if cfg.global_shuffle == "segments":
        ds = ds.random_shuffle(seed=cfg.shuffle_seed)
    return ds


def iter_batches(ds, frame_shape, batch_size: int, cfg: PipelineConfig, drop_last: bool = False,
                 epoch: int = 0, offset: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """numpy triplet batches (frame offset ``offset``) from a segment dataset or a Ray Train shard."""
    shape = tuple(frame_shape)
    batcher = TripletBatcher(shape, batch_size, cfg.local_shuffle_buffer, seed=cfg.shuffle_seed + epoch,
                             drop_last=drop_last, offset=offset)
    return _counted(batcher.batches(dataset_segments(ds, shape, cfg)))


def dataset_segments(ds, frame_shape: tuple[int, ...], cfg: PipelineConfig) -> Iterator[Segment]:
    """The segments of a segment dataset or a Ray Train shard, in the order it hands them out."""
    tables = ds.iter_batches(batch_size=cfg.segments_per_block, batch_format="pyarrow",
                             prefetch_batches=cfg.prefetch_blocks)
    return (seg for t in tables for seg in iter_segments(t, tuple(frame_shape)))


def eval_pipeline(pipe: PipelineConfig) -> PipelineConfig:
    """``pipe`` with the same split and source order but no shuffling: for validation and probe sets."""
    return replace(pipe, global_shuffle="none", local_shuffle_buffer=0)


def batches_with_actions(source: Source, pipe: PipelineConfig, files: list[str], spec: SplitSpec, offset: int,
                         split: Split = "val") -> Iterator[dict[str, np.ndarray]]:
    """The triplets with a true action (frame offset ``offset``) of ``split``'s episodes, in
    source order: ``frames``, ``action``, ``episode_id`` and ``step`` of the rows whose action is
    known."""
    ds = triplet_dataset(source, split, eval_pipeline(pipe), files, spec)
    for b in iter_batches(ds, source.frame_shape, 512, eval_pipeline(pipe), offset=offset):
        keep = b["action"] >= 0
        if keep.any():
            yield {k: b[k][keep] for k in ("frames", "action", "episode_id", "step")}


def _counted(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    for b in batches:
        telemetry.count("triplets_served", len(b["step"]))
        yield b


def torch_batches(ds, frame_shape, batch_size: int, cfg: PipelineConfig, drop_last: bool = False,
                  epoch: int = 0, device=None, offset: int = 1) -> Iterator[dict[str, Any]]:
    """Like ``iter_batches``, as torch tensors: zero-copy on the CPU (``device`` None or a CPU).

    For a GPU the batches are cut and pinned in a background thread, ``cfg.prefetch_blocks``
    batches ahead, and copied with ``non_blocking``: the copy overlaps the previous step's kernels
    and the frames cross as uint8, a quarter of the bytes of float input (the model normalises
    them on the device)."""
    import torch  # lazy: Ray Data's read tasks import this module (select_split) and need no torch

    batches = ({k: torch.from_numpy(v) for k, v in b.items()}
               for b in iter_batches(ds, frame_shape, batch_size, cfg, drop_last, epoch, offset))
    if device is None or torch.device(device).type == "cpu":
        yield from batches
        return
    device = torch.device(device)
    for b in _ahead((({k: v.pin_memory() for k, v in b.items()}) for b in batches), max(1, cfg.prefetch_blocks)):
        yield {k: v.to(device, non_blocking=True) for k, v in b.items()}


def _ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a daemon thread up to ``depth`` ahead of the consumer (which may stop early)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e))

    thread = threading.Thread(target=produce, name="triplet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


def iter_plain_batches(
    source: Source, split: Split, batch_size: int, split_spec: SplitSpec = SplitSpec(),
    files: list[str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Single-process reader over a corpus (Parquet shards), no Ray: the reference loader."""
    if not isinstance(source, CorpusSource):
        raise TypeError("iter_plain_batches reads lapo_ray corpora; convert other sources first")
    shape = tuple(source.frame_shape)
    files = files or [storage.join(source.uri, s.path) for s in source.manifest.shards]

    def segments() -> Iterator[Segment]:
        for uri in files:
            for table in source.file_segments(uri):  # a row group at a time
                yield from iter_segments(select_split(table, split, split_spec), shape)

    return TripletBatcher(shape, batch_size).batches(segments())
