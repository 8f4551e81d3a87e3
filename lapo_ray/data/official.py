"""Any corpus written in the official LAPO expert-data layout (schmidtdominik/LAPO).

The official loader reads ``<game>/train/<n>.npz`` and ``<game>/test/<n>.npz``, each a chunk of a
fixed number of frames (32,768 for train, 4,096 for test: ``TRAIN_CHUNK_LEN``/``TEST_CHUNK_LEN``
of its ``data_loader.py``, which asserts the length), with the arrays ``obs`` (N, 64, 64, 3)
uint8, ``ta`` (the action taken at each frame), ``done`` (True on the first frame of an episode),
``rewards``, ``ep_returns`` and ``values``. ``export_official`` writes a corpus lapo_ray reads
into that layout, its training episodes into ``train/`` and its validation episodes into
``test/``, so that the official code and lapo_ray (which reads the game folder back with
``test/`` as its validation split: ``sources.LapoGameSource``) train on the same frames and
are probed on the same held-out episodes.

Chunks are cut without regard to episodes, as in the official data. The frames left over after
the last whole chunk of each split are not written (the official loader takes whole chunks
only); ``export.json`` records how many.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np

from lapo_ray import UsageError, storage
from lapo_ray.data.corpus import Episode, decode_frames
from lapo_ray.data.sources import Source
from lapo_ray.data.splits import SplitSpec

# The official data_loader's chunk lengths.
TRAIN_CHUNK_FRAMES = 32_768
TEST_CHUNK_FRAMES = 4_096
EXPORT_RECORD = "export.json"


def source_episodes(source: Source) -> Iterator[Episode]:
    """Every episode of ``source``, whole, in the order its files hold them, read in this process
    (no Ray): segments overlap by two frames (``corpus.segment_bounds``), which are dropped
    again here. A file's episodes are yielded once the file has been read."""
    for path in source.scan_files():
        # Collected corpora write each episode into one shard: a file's episodes are whole.
        segments: dict[int, list[dict[str, Any]]] = {}
        for table in source.file_segments(path):
            for row in table.to_pylist():
                segments.setdefault(int(row["episode_id"]), []).append(row)
        for eid, rows in segments.items():
            yield _join_segments(eid, rows, source.frame_shape)


def _join_segments(eid: int, rows: list[dict[str, Any]], frame_shape) -> Episode:
    rows = sorted(rows, key=lambda r: r["start"])
    cut = [0] + [2] * (len(rows) - 1)  # each later segment repeats the two frames before it

    def column(key: str, dtype) -> np.ndarray | None:
        if any(r[key] is None for r in rows):
            return None
        return np.concatenate([np.asarray(r[key], dtype)[c:] for r, c in zip(rows, cut)])

    frames = np.concatenate([decode_frames(r["frames"], r["num_frames"], frame_shape)[c:] for r, c in zip(rows, cut)])
    return Episode(eid, frames, column("actions", np.int64), column("rewards", np.float32), column("dones", bool))


@dataclasses.dataclass
class _Chunker:
    """Appends episodes to one split and writes a chunk file each time ``size`` frames are in."""

    folder: str
    size: int
    parts: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    have: int = 0
    chunks: int = 0
    episodes: int = 0

    def add(self, ep: Episode) -> None:
        n = len(ep)
        actions = ep.actions if ep.actions is not None else np.full(n, -1, np.int64)
        rewards = ep.rewards if ep.rewards is not None else np.zeros(n, np.float32)
        done = np.zeros(n, bool)
        done[0] = True
        arrays = {"obs": ep.frames, "ta": actions.astype(np.int64), "done": done,
                  "rewards": rewards.astype(np.float32),
                  "ep_returns": np.full(n, float(rewards.sum()), np.float32),
                  "values": np.zeros(n, np.float32)}
        for key, value in arrays.items():
            self.parts.setdefault(key, []).append(value)
        self.have += n
        self.episodes += 1
        while self.have >= self.size:
            self._write()

    def _write(self) -> None:
        whole = {k: np.concatenate(v) for k, v in self.parts.items()}
        chunk = {k: v[: self.size] for k, v in whole.items()}
        np.savez(os.path.join(self.folder, f"{self.chunks}.npz"), **chunk)
        self.parts = {k: [v[self.size:]] for k, v in whole.items()}
        self.have -= self.size
        self.chunks += 1

    def record(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "chunk_frames": self.size, "frames": self.chunks * self.size,
                "frames_left_out": self.have, "episodes_read": self.episodes}


def export_official(source: Source, out: str, game: str, spec: SplitSpec,
                    train_chunk: int = TRAIN_CHUNK_FRAMES, test_chunk: int = TEST_CHUNK_FRAMES) -> dict[str, Any]:
    """Write ``source`` as ``out/<game>/{train,test}/<n>.npz`` (``spec``'s validation episodes
    into test/), all at once: the game folder appears only when every chunk is written. An
    existing game folder is refused. Returns what ``export.json`` records."""
    if not storage.is_local(out):
        raise UsageError(f"{out}: the official layout is written to a local folder")
    final = os.path.join(storage.local_path(out), game)
    if os.path.exists(final):
        raise UsageError(f"{final}: exists already; remove it or give another folder")
    if min(train_chunk, test_chunk) < 3:
        raise UsageError(f"chunks of {train_chunk} and {test_chunk} frames: each must hold a triplet")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{game}-", dir=os.path.dirname(final))
    try:
        splits = {"train": _Chunker(os.path.join(tmp, "train"), train_chunk),
                  "test": _Chunker(os.path.join(tmp, "test"), test_chunk)}
        for chunker in splits.values():
            os.makedirs(chunker.folder)
        for ep in source_episodes(source):
            if len(ep) >= 3:
                splits["test" if spec.is_val(np.array([ep.episode_id]))[0] else "train"].add(ep)
        empty = [name for name, c in splits.items() if c.chunks == 0]
        if empty:
            raise UsageError(f"{source.name}: too few frames for one chunk of {' and '.join(empty)} "
                             f"({splits['train'].have} train and {splits['test'].have} test frames read; "
                             f"chunks of {train_chunk} and {test_chunk})")
        record = {"source": source.name, "game": game, "split": spec.to_dict(),
                  **{name: c.record() for name, c in splits.items()}}
        storage.write_json(os.path.join(tmp, EXPORT_RECORD), record)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
