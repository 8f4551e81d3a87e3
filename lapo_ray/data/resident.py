"""The corpus held on the training device (``--data.device-resident true``).

Each Ray Train worker reads its shard of the training split once, the very segments the streaming
path hands it (the split, the weighted order of several sources and their repeats included), and
keeps their frames on its device as uint8, CUDA or CPU alike. Every epoch then cuts and shuffles
triplets there by index: a batch is one gather on the device, with no host work and nothing
crossing the bus. A paper-scale GPU eats 20,000+ triplets/s, which streaming feeds only with a
core or more per GPU; 8M frames of 64x64x3 (98 GB) fit one H200.

What stays as in streaming: a triplet lies within one segment, a segment within one episode and
file, a file within one source, so no triplet crosses those boundaries; one epoch is the multiset
of triplets of the shard's segments, a segment read k times (a source weighted above its size)
giving its triplets k times while its frames are held once. What differs: the shuffle is an exact
permutation of the epoch instead of a local buffer over a seeded file order.

The same ``hold`` serves the paper-scale command, which runs without Ray: ``load_resident`` reads
the split's files itself, in the order ``Source.stream_files`` gives the stream.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from lapo_ray import UsageError, telemetry
from lapo_ray.config.data import PipelineConfig
from lapo_ray.data.sources import ScanReport, Source
from lapo_ray.data.splits import Split, SplitSpec
from lapo_ray.data.triplets import Segment, dataset_segments, iter_segments, select_split

# Every triplet carries four int64 indices on the device (centre frame, episode, step, action)
# and one more per appearance in an epoch.
_INDEX_BYTES = 4 * 8
# Host-to-device copies go in groups of about this size: one copy per segment would be tens of
# thousands of small transfers for a large corpus.
_COPY_GROUP_BYTES = 64 * 2**20


@dataclass
class ResidentTriplets:
    """The triplets of one worker's shard, on one device. ``frames`` holds every distinct segment's
    frames back to back; triplet ``i`` is frames ``centre[i] - d, centre[i], centre[i] + d``;
    ``epoch`` lists each triplet once per time its segment was read."""

    frames: torch.Tensor  # uint8 (F, H, W, C)
    centre: torch.Tensor  # int64 (T,)
    episode_id: torch.Tensor  # int64 (T,)
    step: torch.Tensor  # int64 (T,)
    action: torch.Tensor  # int64 (T,), -1 where unknown
    epoch: torch.Tensor  # int64 (E,): indices into the T triplets
    offset: int = 1

    def __len__(self) -> int:
        return int(self.epoch.numel())

    @property
    def distinct_triplets(self) -> int:
        return int(self.centre.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.frames, self.centre, self.episode_id, self.step,
                                                           self.action, self.epoch))

    @property
    def device(self) -> torch.device:
        return self.frames.device

    def batches(self, batch_size: int, seed: int | None = 0,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch in batches of the triplet contract, on the device: a seeded permutation of the
        epoch (the same on any device), or source order with ``seed`` None."""
        n = len(self)
        if seed is None:
            order = torch.arange(n, device=self.device)
        else:
            # Drawn on the host: torch's CUDA generator gives another permutation than its CPU one.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.device)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            telemetry.count("triplets_served", min(batch_size, n - i))
            yield self.take(self.epoch[order[i : i + batch_size]])

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The triplets ``idx`` (indices of distinct triplets) as a batch."""
        c, d = self.centre[idx], self.offset
        rows = torch.stack((c - d, c, c + d), 1)
        if self.frames.device.type == "cpu":
            # numpy gathers whole rows with a copy each; torch's CPU index kernels were 3-10x slower here.
            frames = torch.from_numpy(self.frames.numpy()[rows.numpy()])
        else:
            frames = gather_rows(self.frames, rows)
        return {"frames": frames, "episode_id": self.episode_id[idx], "step": self.step[idx],
                "action": self.action[idx]}

    def describe(self) -> str:
        return (f"{len(self):,} triplets an epoch ({self.distinct_triplets:,} distinct, {len(self.frames):,} frames, "
                f"{self.nbytes / 2**30:.2f} GiB) on {self.device}")


def gather_rows(frames: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``frames[rows]`` for rows (B, 3), as one gather of whole frames (a GPU's path)."""
    flat = frames.view(len(frames), -1).index_select(0, rows.reshape(-1))
    return flat.view(*rows.shape, *frames.shape[1:])


class _Staging:
    """Distinct segments on the host, before they move to the device together. A segment read
    again (a weighted source's repeat) counts once more instead of being held twice."""

    def __init__(self, offset: int):
        self.offset = offset
        self.frames: list[np.ndarray] = []
        self.meta: list[tuple[int, int, np.ndarray | None]] = []  # (episode id, start, actions)
        self.copies: list[int] = []
        self._seen: dict[tuple[int, int, int], list[int]] = {}

    def add(self, seg: Segment) -> None:
        n = len(seg.frames)
        if n - 2 * self.offset <= 0:
            return  # no triplet, as in the streaming batcher
        key = (seg.episode_id, seg.start, n)
        for i in self._seen.get(key, ()):
            if np.array_equal(self.frames[i], seg.frames) and _same(self.meta[i][2], seg.actions):
                self.copies[i] += 1
                return
        self._seen.setdefault(key, []).append(len(self.frames))
        # Copies: the segments arrive as views into Arrow buffers that the reader frees.
        self.frames.append(np.array(seg.frames))
        self.meta.append((seg.episode_id, seg.start, None if seg.actions is None else np.array(seg.actions)))
        self.copies.append(1)

    def to_device(self, frame_shape: tuple[int, ...], device: torch.device) -> ResidentTriplets:
        sizes = np.array([len(f) for f in self.frames], np.int64)
        base = np.concatenate([[0], np.cumsum(sizes)])
        frames = torch.empty((int(base[-1]), *frame_shape), dtype=torch.uint8, device=device)
        self._copy_frames(frames, base)
        index = self._index(sizes, base)
        return ResidentTriplets(frames, *(torch.from_numpy(a).to(device) for a in index), offset=self.offset)

    def _copy_frames(self, out: torch.Tensor, base: np.ndarray) -> None:
        """Into ``out`` in groups, freeing the staged copies as they go (so a CPU device peaks
        near one copy of the corpus, not two)."""
        first, group, size = 0, [], 0
        for i in range(len(self.frames)):
            group.append(self.frames[i])
            self.frames[i] = None
            size += group[-1].nbytes
            if size >= _COPY_GROUP_BYTES or i == len(self.frames) - 1:
                out[base[first] : base[i + 1]].copy_(torch.from_numpy(np.concatenate(group)))
                first, group, size = i + 1, [], 0

    def _index(self, sizes: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, ...]:
        """centre, episode_id, step, action and epoch arrays of every triplet."""
        d = self.offset
        counts = sizes - 2 * d
        seg = np.repeat(np.arange(len(sizes)), counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + d
        centre = base[:-1][seg] + within
        ids = np.array([m[0] for m in self.meta], np.int64)[seg]
        step = np.array([m[1] for m in self.meta], np.int64)[seg] + within
        frame_action = np.concatenate([m[2] if m[2] is not None else np.full(n, -1) for m, n in zip(self.meta, sizes)]
                                      ).astype(np.int64) if len(sizes) else np.zeros(0, np.int64)
        action = frame_action[centre] if len(centre) else np.zeros(0, np.int64)
        epoch = np.repeat(np.arange(len(centre)), np.repeat(np.array(self.copies, np.int64), counts))
        return centre.astype(np.int64), ids, step, action, epoch.astype(np.int64)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def hold(segments: Iterable[Segment], frame_shape: tuple[int, ...], device: torch.device | str,
         offset: int = 1) -> ResidentTriplets:
    """The triplets (frame offset ``offset``) of ``segments``, held on ``device``."""
    staging = _Staging(offset)
    for seg in segments:
        staging.add(seg)
    return staging.to_device(tuple(frame_shape), torch.device(device))


def hold_dataset(ds, frame_shape: tuple[int, ...], device: torch.device | str, pipe: PipelineConfig,
                 offset: int = 1, name: str = "") -> ResidentTriplets:
    """A Ray Train shard (or any segment dataset) read once and held on ``device``."""
    t0 = time.monotonic()
    resident = hold(dataset_segments(ds, tuple(frame_shape), pipe), frame_shape, device, offset)
    print(f"{f'[{name}] ' if name else ''}held {resident.describe()} in {time.monotonic() - t0:.1f}s", flush=True)
    return resident


def split_segments(source: Source, split: Split, pipe: PipelineConfig, files: list[str], spec: SplitSpec,
                   weighted: bool = False) -> Iterator[Segment]:
    """The segments of ``split`` as the streaming path reads them (``triplets.triplet_dataset``:
    the same files in the same order, repeats included), read in this process without Ray."""
    seed = pipe.shuffle_seed if pipe.global_shuffle in ("files", "segments") else None
    shape = tuple(source.frame_shape)
    for f in source.stream_files(list(files), spec, split, seed, weighted):
        for table in source.file_segments(f):
            yield from iter_segments(select_split(table, split, spec), shape)


def load_resident(source: Source, split: Split, pipe: PipelineConfig, files: list[str], spec: SplitSpec,
                  device: torch.device | str, offset: int = 1, weighted: bool = False) -> ResidentTriplets:
    """``split`` of ``source`` held on ``device``, without Ray (the paper-scale command)."""
    return hold(split_segments(source, split, pipe, files, spec, weighted), tuple(source.frame_shape), device, offset)


# ---- will it fit? ------------------------------------------------------------------------------


def estimate_split_bytes(scan: ScanReport, spec: SplitSpec, split: Split, frame_shape: tuple[int, ...],
                         segment_frames: int = 256) -> int:
    """What ``split`` of a scanned corpus takes held on a device: its frames (segments overlap by
    two frames, counted at ``segment_frames`` a segment, the collector's default) and indices."""
    ids = np.asarray(scan.episode_ids, np.int64)
    triplets = np.asarray(scan.episode_triplets, np.int64)
    if len(triplets) != len(ids):  # a scan without per-episode counts: the split's share of the whole
        keep_share = float(np.mean(spec.keep(ids, split))) if len(ids) else 1.0
        n, episodes = int(scan.triplets * keep_share), int(len(ids) * keep_share)
    else:
        keep = spec.keep(ids, split)
        n, episodes = int(triplets[keep].sum()), int(keep.sum())
    frames = n + 2 * episodes + 2 * math.ceil(n / max(1, segment_frames - 2))
    return frames * int(np.prod(frame_shape)) + n * (_INDEX_BYTES + 8)


def device_memory(device: torch.device | str) -> tuple[str, int]:
    """(name, free bytes) of ``device`` as this process sees it: a GPU's free memory, or the
    host's available memory for a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return torch.cuda.get_device_name(device), int(free)
    return "cpu", _host_available()


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def worker_device_memory(use_gpu: bool) -> tuple[str, int]:
    """(name, free bytes) of the device a Train worker will train on: asked of a node that has
    one, in a task that holds a GPU when ``use_gpu``, or of this process when Ray is not running."""
    import ray  # lazy: jobs import this before they check their input (architecture.md, Imports)

    device = "cuda" if use_gpu else "cpu"
    if not ray.is_initialized():
        return device_memory(device)
    probe = ray.remote(num_cpus=0, num_gpus=1 if use_gpu else 0)(device_memory).options(name="lapo-device-memory")
    return ray.get(probe.remote(device))


def check_fits(need: int, device_name: str, free: int, margin: int, what: str = "the training split") -> None:
    """Refuse, in one line naming the sizes, a corpus that does not fit its device's free memory
    less ``margin`` kept for the model, its optimiser and activations."""
    room = free - margin
    if need <= room:
        return
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    raise UsageError(
        f"--data.device-resident: {what} needs about {gib(need)} on each worker's device, but {device_name} has "
        f"{gib(free)} free, {gib(margin)} of it kept for the model (--data.resident-margin-gb), so at most "
        f"{gib(max(room, 0))} for the corpus; train on more GPUs (--stage1.num-workers), use a smaller corpus, "
        "or stream it (--data.device-resident false)")
