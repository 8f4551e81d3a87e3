"""The lapo_ray corpus: sharded Parquet of episode segments plus a manifest.

Layout of a corpus directory (local path or URI)::

    manifest.json                 written last; its presence means the corpus is complete
    collect_config.json           how the collection was asked for (used to resume safely)
    shards/w000-00000.parquet     whole episode segments, never half an episode segment

One Parquet row is one *segment*: up to ``max_segment_frames`` consecutive frames of one
episode. Long episodes are cut into segments that overlap by two frames, so that every triplet
(o[t-1], o[t], o[t+1]) of the episode lies inside exactly one segment: segment k covers frames
[s, s+L) and owns the triplet centres s+1 .. s+L-2; the next segment starts at s+L-2. A triplet
never spans two episodes because a segment never does.

Columns (``SEGMENT_SCHEMA``): ``episode_id`` int64, ``start`` int32 (index of the segment's first
frame within its episode), ``num_frames`` int32, ``frames`` binary (uint8, num_frames x H x W x C,
C-order), and, where the source has them, ``actions`` (the action taken at each frame, -1 where
unknown), ``rewards`` and ``dones`` (True on the last frame of an episode that ended). Those three
are for evaluation only: training never reads them.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lapo_ray import MissingPathError, UsageError, storage

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
OPTIONAL_COLUMNS = ("actions", "rewards", "dones")

SEGMENT_SCHEMA = pa.schema(
    [
        ("episode_id", pa.int64()),
        ("start", pa.int32()),
        ("num_frames", pa.int32()),
        ("frames", pa.binary()),
        ("actions", pa.list_(pa.int64())),
        ("rewards", pa.list_(pa.float32())),
        ("dones", pa.list_(pa.bool_())),
    ]
)


class CorpusError(UsageError):
    """Bad or inconsistent input data. The message always names the offending file."""


@dataclass
class Episode:
    """Frames of one episode (or one video), uint8 (T, H, W, C), plus optional labels."""

    episode_id: int
    frames: np.ndarray
    actions: np.ndarray | None = None
    rewards: np.ndarray | None = None
    dones: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def check_frames(frames: Any, frame_shape: Sequence[int] | None, where: str) -> np.ndarray:
    """Validate a frame array: uint8, (T, H, W, C), and the expected (H, W, C) if given."""
    if not isinstance(frames, np.ndarray):
        raise CorpusError(f"{where}: frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise CorpusError(f"{where}: frames must be uint8, got dtype {frames.dtype}")
    if frames.ndim != 4:
        raise CorpusError(
            f"{where}: frames must have shape (T, H, W, C), got shape {tuple(frames.shape)}"
        )
    if frame_shape is not None and tuple(frames.shape[1:]) != tuple(frame_shape):
        raise CorpusError(
            f"{where}: frames have shape (H, W, C) = {tuple(frames.shape[1:])}, "
            f"expected {tuple(frame_shape)}"
        )
    return frames


def segment_bounds(num_frames: int, max_segment_frames: int) -> list[tuple[int, int]]:
    """[start, stop) of the overlapping segments of an episode (see module docstring)."""
    if max_segment_frames < 3:
        raise ValueError(f"max_segment_frames must be >= 3, got {max_segment_frames}")
    if num_frames <= max_segment_frames:
        return [(0, num_frames)]
    bounds, start = [], 0
    while True:
        stop = min(start + max_segment_frames, num_frames)
        bounds.append((start, stop))
        if stop == num_frames:
            return bounds
        start = stop - 2


def episode_to_rows(episode: Episode, max_segment_frames: int) -> list[dict[str, Any]]:
    """Cut an episode into segment rows (dicts in ``SEGMENT_SCHEMA``)."""
    frames = np.ascontiguousarray(episode.frames)
    rows = []
    for start, stop in segment_bounds(len(episode), max_segment_frames):
        rows.append(
            {
                "episode_id": int(episode.episode_id),
                "start": start,
                "num_frames": stop - start,
                "frames": frames[start:stop].tobytes(),
                "actions": None if episode.actions is None else episode.actions[start:stop].astype(np.int64).tolist(),
                "rewards": None if episode.rewards is None else episode.rewards[start:stop].astype(np.float32).tolist(),
                "dones": None if episode.dones is None else episode.dones[start:stop].astype(bool).tolist(),
            }
        )
    return rows


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA)


# Decoded bytes of frames per Parquet row group at most. A reader decodes a row group whole: a
# labelling actor and the plain reader hold one at a time, so a group sized by segments instead
# could make a whole shard one group of 100 MB. (Ray Data packs row groups into read tasks of up
# to 128 MiB either way.)
ROW_GROUP_BYTES = 16 * 2**20


def write_shard(uri: str, rows: list[dict[str, Any]], compression: str = "zstd") -> None:
    """Write segment rows to one Parquet shard, atomically (write, then rename)."""
    buf = io.BytesIO()
    largest = max((len(r["frames"]) for r in rows), default=1)
    pq.write_table(rows_to_table(rows), buf, compression=compression,
                   row_group_size=max(1, ROW_GROUP_BYTES // max(1, largest)))
    storage.write_bytes(uri, buf.getvalue())


def decode_frames(blob, num_frames: int, frame_shape: Sequence[int]) -> np.ndarray:
    """Inverse of the ``frames`` column encoding, without a copy."""
    arr = np.frombuffer(blob, dtype=np.uint8)
    expected = num_frames * int(np.prod(frame_shape))
    if arr.size != expected:
        raise CorpusError(
            f"segment holds {arr.size} bytes, expected {expected} for {num_frames} frames of "
            f"{tuple(frame_shape)}"
        )
    return arr.reshape(num_frames, *frame_shape)


@dataclass
class ShardInfo:
    path: str  # relative to the corpus root
    frames: int
    segments: int
    episodes: int


@dataclass
class Manifest:
    """What a corpus holds and how it was made."""

    game: str
    frame_shape: tuple[int, int, int]
    num_frames: int
    num_episodes: int
    num_segments: int
    num_triplets: int
    columns: list[str]
    shards: list[ShardInfo]
    made_by: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "Manifest":
        try:
            d = dict(d)
            if d.get("format_version") != FORMAT_VERSION:
                raise CorpusError(
                    f"{where}: unsupported corpus format_version {d.get('format_version')!r} "
                    f"(this lapo_ray reads {FORMAT_VERSION})"
                )
            d["frame_shape"] = tuple(d["frame_shape"])
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise CorpusError(f"{where}: malformed manifest ({e})") from e


def read_manifest(corpus_uri: str) -> Manifest:
    uri = storage.join(corpus_uri, MANIFEST)
    if not storage.exists(corpus_uri):
        raise MissingPathError(f"{corpus_uri}: corpus directory does not exist")
    if not storage.exists(uri):
        raise CorpusError(
            f"{corpus_uri}: no {MANIFEST}; this is not a finished lapo_ray corpus "
            "(an interrupted collection resumes when jobs/collect.py is run again with the same flags)"
        )
    return Manifest.from_dict(storage.read_json(uri), where=uri)


def read_actions(corpus_uri: str) -> np.ndarray:
    """Every stored action of a corpus, each frame once (continuation segments repeat two)."""
    manifest = read_manifest(corpus_uri)
    if "actions" not in manifest.columns:
        raise CorpusError(f"{corpus_uri}: the corpus has no actions column (observation-only video)")
    parts = []
    for shard in manifest.shards:
        with storage.open_input(storage.join(corpus_uri, shard.path)) as f:
            table = pq.read_table(f, columns=["start", "actions"])
        for start, acts in zip(table.column("start").to_pylist(), table.column("actions").to_pylist()):
            parts.append(np.asarray(acts[2:] if start > 0 else acts, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def shard_stats(rows: Iterable[dict[str, Any]]) -> tuple[int, int, int]:
    """(frames, segments, episodes) of a shard's rows, counting overlap frames once."""
    frames = segments = 0
    episodes = set()
    for r in rows:
        # The first two frames of a continuation segment repeat the previous segment's last two.
        frames += r["num_frames"] - (2 if r["start"] > 0 else 0)
        segments += 1
        episodes.add(r["episode_id"])
    return frames, segments, len(episodes)


def build_manifest(
    corpus_uri: str, game: str, frame_shape: Sequence[int], made_by: dict[str, Any]
) -> Manifest:
    """Scan the finished shards (footers and small columns only) and describe them."""
    shard_root = storage.join(corpus_uri, SHARD_DIR)
    fs, _ = storage.resolve(corpus_uri)
    shards, columns = [], set()
    total_frames = total_segments = total_triplets = 0
    episodes: set[int] = set()
    for path in storage.list_files(shard_root, suffix=".parquet"):
        name = posixpath.basename(path)
        if name.startswith("."):
            continue
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["episode_id", "start", "num_frames", *OPTIONAL_COLUMNS])
        rows = table.select(["episode_id", "start", "num_frames"]).to_pylist()
        frames, segs, eps = shard_stats(rows)
        for c in OPTIONAL_COLUMNS:
            if table.column(c).null_count < table.num_rows:
                columns.add(c)
        total_triplets += sum(max(r["num_frames"] - 2, 0) for r in rows)
        episodes.update(r["episode_id"] for r in rows)
        shards.append(ShardInfo(f"{SHARD_DIR}/{name}", frames, segs, eps))
        total_frames += frames
        total_segments += segs
    if not shards:
        raise CorpusError(f"{shard_root}: no shards to describe")
    return Manifest(
        game=game,
        frame_shape=tuple(int(x) for x in frame_shape),
        num_frames=total_frames,
        num_episodes=len(episodes),
        num_segments=total_segments,
        num_triplets=total_triplets,
        columns=sorted(columns),
        shards=shards,
        made_by={**made_by, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )


def write_manifest(corpus_uri: str, manifest: Manifest) -> None:
    storage.write_json(storage.join(corpus_uri, MANIFEST), manifest.to_dict())


def write_corpus(
    corpus_uri: str,
    episodes: Iterable[Episode],
    game: str,
    frame_shape: Sequence[int] | None = None,
    made_by: dict[str, Any] | None = None,
    shard_frames: int = 8192,
    max_segment_frames: int = 256,
    shard_prefix: str = "w000",
) -> Manifest:
    """Write episodes as a complete corpus (shards, then the manifest). Used by importers and
    tests; ``jobs/collect.py`` streams shards from many actors through the same functions."""
    rows: list[dict[str, Any]] = []
    n_frames = shard_idx = 0
    for ep in episodes:
        check_frames(ep.frames, frame_shape, where=f"episode {ep.episode_id}")
        frame_shape = ep.frames.shape[1:]
        rows.extend(episode_to_rows(ep, max_segment_frames))
        n_frames += len(ep)
        if n_frames >= shard_frames:
            write_shard(shard_uri(corpus_uri, shard_prefix, shard_idx), rows)
            rows, n_frames, shard_idx = [], 0, shard_idx + 1
    if rows:
        write_shard(shard_uri(corpus_uri, shard_prefix, shard_idx), rows)
    if frame_shape is None:
        raise CorpusError(f"{corpus_uri}: no episodes to write")
    manifest = build_manifest(corpus_uri, game, frame_shape, made_by or {})
    write_manifest(corpus_uri, manifest)
    return manifest


def shard_uri(corpus_uri: str, prefix: str, index: int) -> str:
    return storage.join(corpus_uri, SHARD_DIR, f"{prefix}-{index:05d}.parquet")
