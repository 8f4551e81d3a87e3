"""The three sources of frames, each read into the same stream of episode segments.

* ``CorpusSource``: the project's own corpus (``lapo_ray.data.corpus``).
* ``LapoNpzSource``: the official LAPO expert-data layout ``<game>/{train,test}/<n>.npz`` with
  keys ``obs`` (N, 64, 64, 3) uint8, ``ta``, ``done``, ``rewards``, ``ep_returns``, ``values``:
  one split's folder; or one game's folder (``LapoGameSource``), with ``test/`` as validation.
* ``VideoFolderSource``: ordinary video files (mp4, webm, avi, mkv, mov), one file per episode,
  decoded with PyAV and resized to the model's frame size.

Every source first ``scan``s its files (in parallel Ray tasks for npz and video) so that bad
input is found before training starts and is reported by file name; with ``on_bad="skip"`` bad
files are left out, counted and listed in the ``ScanReport`` instead. A source also splits itself
by episode (``split``) and orders its files for a stream (``stream_files``); a source of several
(``data.mixture.MultiSource``) does both per source and gives its parts back (``source_parts``).
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lapo_ray import MissingPathError, UsageError, storage
from lapo_ray.envs import OBS_SHAPE
from lapo_ray.data.corpus import (
    CorpusError,
    Episode,
    check_frames,
    episode_to_rows,
    read_manifest,
    rows_to_table,
)
from lapo_ray.data.splits import Split, SplitSpec

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov")
OnBad = Literal["raise", "skip"]
# Episode ids of file-based sources: file index in the high bits, episode within the file low.
_EPISODES_PER_FILE_BITS = 24


@dataclass
class ScanReport:
    """What a scan found: usable files and their sizes, and the files left out and why."""

    files: list[str]
    frames: int
    episodes: int
    triplets: int
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    # Every episode id of the usable files: what an exact train/validation split is made from.
    episode_ids: list[int] = field(default_factory=list)
    # Triplets per usable file and per episode (aligned with ``files`` and ``episode_ids``): what a
    # corpus of several sources weighs its sources and counts their splits by (data.mixture).
    file_triplets: list[int] = field(default_factory=list)
    episode_triplets: list[int] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{len(self.files)} files, {self.episodes} episodes, {self.frames} frames, {self.triplets} triplets"
        if self.bad_files:
            s += f"; skipped {len(self.bad_files)} bad files: " + "; ".join(
                f"{p} ({why})" for p, why in self.bad_files[:5]
            )
        return s


class Source:
    """A set of files that yields episode segments (rows in ``corpus.SEGMENT_SCHEMA``)."""

    name: str
    frame_shape: tuple[int, int, int]
    has_actions: bool

    def scan(self, on_bad: OnBad = "raise") -> ScanReport:
        raise NotImplementedError

    def scan_files(self) -> list[str]:
        """Every file of the source, in its natural order, without opening them."""
        raise NotImplementedError

    def segments(self, files: list[str] | None = None):
        """A Ray Dataset of segment rows for ``files`` in the given order (default: all files)."""
        raise NotImplementedError

    def file_segments(self, path: str) -> Iterator[pa.Table]:
        """The segment rows of one file as Arrow tables, read in this process without Ray (a
        labelling actor reads its file itself and writes one output shard for it)."""
        raise NotImplementedError

    def file_stem(self, path: str) -> str:
        """What a per-file output (a labelled shard) is named after: the file's name."""
        return posixpath.basename(path.split("?", 1)[0])

    def split(self, scan: ScanReport, val_fraction: float, seed: int) -> SplitSpec:
        """The validation episodes of ``scan`` (this source's scan), by ``SplitSpec.for_episodes``."""
        return SplitSpec.for_episodes(scan.episode_ids, val_fraction, seed)

    def stream_files(self, files: list[str], spec: SplitSpec, split: Split, seed: int | None,
                     weighted: bool = False) -> list[str]:
        """The order in which ``files`` are read for ``split``: as given, or a random order seeded
        by ``seed``. A source of several weighs its parts here (``weighted``); one source reads
        every file once whatever the split."""
        if seed is None:
            return list(files)
        return [files[i] for i in np.random.default_rng(seed).permutation(len(files))]

    def source_parts(self, files: list[str], spec: SplitSpec) -> list[SourcePart]:
        """The sources this one reads as one, each with its share of ``files`` and ``spec``; none
        for a single source, which is all of itself."""
        return []

    def source_counts(self, spec: SplitSpec) -> list[dict[str, Any]]:
        """Per part (``source_parts``): files, episodes and triplets, in all and per split."""
        return []


@dataclass(frozen=True)
class SourcePart:
    """One source of several read as one: ``files`` and ``spec`` as it names its own files and
    episodes, ``label`` as ``--corpus`` names it."""

    label: str
    source: Source
    files: list[str]
    spec: SplitSpec


def _episodes_file_id(file_index: int, episode_index: int) -> int:
    return (file_index << _EPISODES_PER_FILE_BITS) | episode_index


def _finish_scan(results: list[dict[str, Any]], on_bad: OnBad, what: str) -> ScanReport:
    good = [r for r in results if r["error"] is None]
    bad = [(r["path"], r["error"]) for r in results if r["error"] is not None]
    if not good:
        raise CorpusError(f"no usable {what} files: {_listing(bad)}")
    if bad and on_bad == "raise":
        raise CorpusError(f"{len(bad)} bad {what} file(s): {_listing(bad)}; "
                          "pass --data.on-bad-files skip to leave them out")
    return ScanReport(
        files=[r["path"] for r in good],
        frames=sum(r["frames"] for r in good),
        episodes=sum(r["episodes"] for r in good),
        triplets=sum(r["triplets"] for r in good),
        bad_files=bad,
        episode_ids=sorted(i for r in good for i in r["episode_ids"]),
        file_triplets=[sum(r["episode_triplets"]) if "episode_triplets" in r else r["triplets"] for r in good],
        episode_triplets=_episode_triplets(good),
    )


def _episode_triplets(good: list[dict[str, Any]]) -> list[int]:
    """Triplets per episode id, in sorted id order. An episode split over files adds up, and is
    counted at its first place in the listing (the ids of the files are listed one after another)."""
    counts: dict[int, int] = {}
    for r in good:
        for e, n in zip(r["episode_ids"], r.get("episode_triplets", ())):
            counts[e] = counts.get(e, 0) + n
    return [counts.pop(e, 0) for e in sorted(i for r in good for i in r["episode_ids"])]


def _listing(bad: list[tuple[str, str]], most: int = 5) -> str:
    """One line, so that a job's error stays one line however many files are bad."""
    shown = "; ".join(f"{p}: {why}" for p, why in bad[:most])
    return shown + (f"; and {len(bad) - most} more" if len(bad) > most else "")


def _scan_parallel(paths: list[str], check: Callable[[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``check(path, index in paths)`` on every file in Ray tasks (or inline when Ray is not
    running). The index travels with the path: looking it up per file would be quadratic."""
    import ray  # lazy: jobs import this before they check their input (architecture.md, Imports)

    if not ray.is_initialized() or len(paths) < 4:
        return [check(p, i) for i, p in enumerate(paths)]
    remote = ray.remote(num_cpus=1)(_apply).options(name="lapo-scan-file")
    fn = ray.put(check)  # the source (with its listing) goes to the object store once, not per task
    return ray.get([remote.remote(fn, p, i) for i, p in enumerate(paths)])


def _apply(fn: Callable[[str, int], dict[str, Any]], path: str, index: int) -> dict[str, Any]:
    return fn(path, index)


def _rows_dataset(paths: list[str], read: Callable[[str], list[dict[str, Any]]]):
    """A Ray Dataset that reads each file in its own task, emitting segment rows."""
    import ray.data  # lazy: jobs import this before they check their input (architecture.md, Imports)

    def read_batch(batch: dict[str, np.ndarray]) -> pa.Table:
        rows: list[dict[str, Any]] = []
        for p in batch["path"]:
            rows.extend(read(p))
        return rows_to_table(rows)

    return ray.data.from_items([{"path": p} for p in paths]).map_batches(
        read_batch, batch_size=1, batch_format="numpy", num_cpus=1
    )


# --------------------------------------------------------------------------- project corpus


class CorpusSource(Source):
    def __init__(self, uri: str):
        self.uri = uri
        self.manifest = read_manifest(uri)
        self.name = f"corpus:{uri}"
        self.frame_shape = tuple(self.manifest.frame_shape)
        self.has_actions = "actions" in self.manifest.columns

    def scan(self, on_bad: OnBad = "raise") -> ScanReport:
        fs, _ = storage.resolve(self.uri)
        results = []
        for shard in self.manifest.shards:
            uri = storage.join(self.uri, shard.path)
            _, path = storage.resolve(uri)
            error, episode_ids, episode_triplets = None, [], []
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                error = "shard listed in manifest.json is missing"
            else:
                try:
                    with fs.open_input_file(path) as f:
                        pf = pq.ParquetFile(f)
                        if pf.metadata.num_rows != shard.segments:
                            error = f"has {pf.metadata.num_rows} segments, manifest says {shard.segments}"
                        else:
                            t = pf.read(columns=["episode_id", "num_frames"])
                            ids = t.column(0).to_numpy()
                            # Segments overlap by two frames: a segment of n frames holds n - 2 triplets.
                            per_segment = t.column(1).to_numpy().astype(np.int64) - 2
                            episode_ids, inverse = np.unique(ids, return_inverse=True)
                            episode_triplets = np.bincount(inverse, per_segment, len(episode_ids)).astype(np.int64).tolist()
                            episode_ids = episode_ids.tolist()
                except (OSError, pa.ArrowInvalid) as e:
                    error = f"unreadable Parquet ({e})"
            results.append(
                {"path": uri, "error": error, "frames": shard.frames, "episodes": shard.episodes,
                 "triplets": shard.frames - 2 * shard.episodes, "episode_ids": episode_ids if error is None else [],
                 "episode_triplets": episode_triplets if error is None else []}
            )
        report = _finish_scan(results, on_bad, "corpus shard")
        # Segments overlap by two frames, so the manifest's exact count beats frames - 2 * episodes
        # when episodes were split into several segments.
        if not report.bad_files:
            report.triplets = self.manifest.num_triplets
        return report

    def scan_files(self) -> list[str]:
        return [storage.join(self.uri, s.path) for s in self.manifest.shards]

    def segments(self, files: list[str] | None = None):
        import ray.data  # lazy: jobs import this before they check their input (architecture.md, Imports)

        files = files or self.scan_files()
        fs, _ = storage.resolve(self.uri)
        paths = [storage.resolve(f)[1] for f in files]
        return ray.data.read_parquet(paths, filesystem=fs, file_extensions=None)

    def file_segments(self, path: str) -> Iterator[pa.Table]:
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            # One row group at a time: a shard can be larger than a labeller should hold.
            for rg in range(pf.num_row_groups):
                yield pf.read_row_group(rg)


# --------------------------------------------------------------------------- LAPO npz layout


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with storage.open_input(path) as f:
            data = np.load(f, allow_pickle=False)
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file")
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise CorpusError(f"{path}: corrupt or truncated npz ({type(e).__name__}: {e})") from e


def npz_episodes(path: str, file_index: int, frame_shape=None) -> list[Episode]:
    """Split one LAPO npz chunk into episodes.

    ``done[t]`` marks obs[t] as the first frame of a new episode: the official PPO loop stores
    ``dones[step] = next_done`` beside ``obs[step] = next_obs``, and Procgen returns the next
    episode's first frame together with done=True. Chunks are cut without regard to episodes,
    so the pieces at both ends of a chunk are kept as (partial) episodes of their own; no
    episode continues across files.
    """
    data = _load_npz(path)
    if "obs" not in data:
        raise CorpusError(f"{path}: npz has no 'obs' array (keys: {sorted(data)})")
    obs = check_frames(data["obs"], frame_shape, where=path)
    n = len(obs)
    for key in ("ta", "done", "rewards"):
        if key in data and len(data[key]) != n:
            raise CorpusError(f"{path}: '{key}' has length {len(data[key])}, 'obs' has {n}")
    done = data["done"].astype(bool) if "done" in data else np.zeros(n, bool)
    starts = [0, *np.flatnonzero(done[1:]) + 1, n]
    episodes = []
    for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        if b - a < 3:  # too short to hold a triplet
            continue
        ended = np.zeros(b - a, bool)
        ended[-1] = b < n  # the episode ended if a new one starts right after it
        episodes.append(
            Episode(
                episode_id=_episodes_file_id(file_index, k),
                frames=obs[a:b],
                actions=data["ta"][a:b].astype(np.int64) if "ta" in data else None,
                rewards=data["rewards"][a:b].astype(np.float32) if "rewards" in data else None,
                dones=ended,
            )
        )
    if not episodes:
        raise CorpusError(f"{path}: no episode with at least 3 frames")
    return episodes


class FileSource(Source):
    """A source whose files each hold whole episodes (``read_episodes``); episodes never span files."""

    kind = "file"
    paths: list[str]
    max_segment_frames: int

    def read_episodes(self, path: str, file_index: int) -> list[Episode]:
        raise NotImplementedError

    def _check(self, path: str, file_index: int) -> dict[str, Any]:
        try:
            eps = self.read_episodes(path, file_index)
        except CorpusError as e:
            return {"path": path, "error": str(e).removeprefix(f"{path}: "), "frames": 0, "episodes": 0,
                    "triplets": 0, "episode_ids": []}
        return {"path": path, "error": None, "frames": sum(map(len, eps)), "episodes": len(eps),
                "triplets": sum(len(e) - 2 for e in eps), "episode_ids": [e.episode_id for e in eps],
                "episode_triplets": [len(e) - 2 for e in eps]}

    def scan_files(self) -> list[str]:
        return list(self.paths)

    def scan(self, on_bad: OnBad = "raise") -> ScanReport:
        return _finish_scan(_scan_parallel(self.paths, self._check), on_bad, self.kind)

    @functools.cached_property
    def file_index(self) -> dict[str, int]:
        """Each file's index in the full, sorted listing. Episode ids come from it, so they do not
        change with the order or subset of files read."""
        return {p: i for i, p in enumerate(self.paths)}

    def segments(self, files: list[str] | None = None):
        index = self.file_index

        def read(path: str) -> list[dict[str, Any]]:
            return [row for ep in self.read_episodes(path, index[path])
                    for row in episode_to_rows(ep, self.max_segment_frames)]

        return _rows_dataset(files or self.paths, read)

    def file_segments(self, path: str) -> Iterator[pa.Table]:
        for ep in self.read_episodes(path, self.file_index[path]):
            yield rows_to_table(episode_to_rows(ep, self.max_segment_frames))


class LapoNpzSource(FileSource):
    """``root/<game>/<split>/<n>.npz`` (or ``root`` pointing at the split folder itself)."""

    kind = "npz"

    def __init__(self, root: str, game: str | None = None, split: str = "train",
                 max_segment_frames: int = 256):
        folder = storage.join(root, game, split) if game else root
        self.folder = folder
        paths = sorted(
            storage.list_files(folder, suffix=".npz"),
            key=lambda p: (len(posixpath.basename(p)), posixpath.basename(p)),
        )
        if not paths:
            raise CorpusError(f"{folder}: no .npz files")
        self.paths = [_as_uri(folder, p) for p in paths]
        self.name = f"lapo-npz:{folder}"
        self.frame_shape = OBS_SHAPE  # the official LAPO data is Procgen's
        self.has_actions = True
        self.max_segment_frames = max_segment_frames

    def read_episodes(self, path: str, file_index: int) -> list[Episode]:
        return npz_episodes(path, file_index, self.frame_shape)


class LapoGameSource(LapoNpzSource):
    """One game's folder of the official layout, ``<game>/train`` and ``<game>/test`` read as one
    corpus whose validation split is ``test/`` (the official code's own held-out data), whatever
    ``--data.val-fraction`` says: the frames lapo_ray trains on are then the official loader's."""

    def __init__(self, folder: str, max_segment_frames: int = 256):
        super().__init__(storage.join(folder, "train"), max_segment_frames=max_segment_frames)
        test = LapoNpzSource(storage.join(folder, "test"), max_segment_frames=max_segment_frames)
        self.folder, self.name = folder, f"lapo-npz:{folder}"
        self.paths = [*self.paths, *test.paths]
        self.test_paths = frozenset(test.paths)

    def file_stem(self, path: str) -> str:
        """``train-0.npz`` and ``test-0.npz``: both splits number their chunks from 0."""
        name = super().file_stem(path)
        return f"{'test' if path in self.test_paths else 'train'}-{name}"

    def split(self, scan: ScanReport, val_fraction: float, seed: int) -> SplitSpec:
        index = self.file_index
        test_files = {index[p] for p in self.test_paths}
        val = tuple(sorted(e for e in scan.episode_ids if e >> _EPISODES_PER_FILE_BITS in test_files))
        return SplitSpec(val_fraction, seed, val)


def is_lapo_game_folder(uri: str) -> bool:
    """``uri`` holds ``train/`` and ``test/`` folders of .npz chunks (one game of the official layout)."""
    return all(storage.is_dir(storage.join(uri, s)) and storage.list_files(storage.join(uri, s), suffix=".npz")
               for s in ("train", "test"))


def _as_uri(folder: str, path: str) -> str:
    """A listed file as a URI when the folder is one (pyarrow lists bare paths)."""
    return storage.join(folder, posixpath.basename(path)) if "://" in folder else path


# --------------------------------------------------------------------------- video files


def decode_video(path: str, frame_size: tuple[int, int]) -> np.ndarray:
    """All frames of a video as uint8 (T, H, W, 3), resized to ``frame_size`` = (H, W)."""
    # lazy: the paths without video (the paper-scale command on a GPU machine) run where PyAV is not
    import av

    height, width = frame_size
    frames = []
    try:
        with storage.open_input(path) as f, av.open(f, mode="r") as container:
            if not container.streams.video:
                raise CorpusError(f"{path}: file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(width=width, height=height, format="rgb24"))
    except CorpusError:
        raise
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file")
    except Exception as e:  # av.error.InvalidDataError and friends
        raise CorpusError(f"{path}: corrupt or unreadable video ({type(e).__name__}: {e})") from e
    if len(frames) < 3:
        raise CorpusError(f"{path}: video has {len(frames)} frame(s); a triplet needs at least 3")
    return np.stack(frames)


class VideoFolderSource(FileSource):
    """Every video file directly inside ``folder``; each file is one episode."""

    kind = "video"

    def __init__(self, folder: str, frame_size: tuple[int, int] = (64, 64),
                 max_segment_frames: int = 256):
        self.folder = folder
        self.paths = [_as_uri(folder, p) for p in storage.list_files(folder)
                      if os.path.splitext(p)[1].lower() in VIDEO_EXTENSIONS]
        if not self.paths:
            raise CorpusError(f"{folder}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
        self.name = f"videos:{folder}"
        self.frame_size = tuple(frame_size)
        self.frame_shape = (*self.frame_size, 3)
        self.has_actions = False
        self.max_segment_frames = max_segment_frames

    def read_episodes(self, path: str, file_index: int) -> list[Episode]:
        return [Episode(_episodes_file_id(file_index, 0), decode_video(path, self.frame_size))]


def open_source(uri: str, frame_size: tuple[int, int] = (64, 64), game: str | None = None,
                split: str = "train") -> Source:
    """Pick the source type from what the folder holds."""
    if not storage.exists(uri):
        raise MissingPathError(f"{uri}: no such directory")
    if not storage.is_dir(uri):
        raise UsageError(f"{uri}: not a directory; give the folder that holds the corpus, .npz or video files")
    if storage.exists(storage.join(uri, "manifest.json")) or storage.exists(storage.join(uri, "shards")):
        return CorpusSource(uri)
    names = [posixpath.basename(p) for p in storage.list_files(uri)]
    if any(n.endswith(".npz") for n in names):
        return LapoNpzSource(uri)
    if game and storage.exists(storage.join(uri, game, split)):
        return LapoNpzSource(uri, game=game, split=split)
    if is_lapo_game_folder(uri):
        return LapoGameSource(uri)
    if any(os.path.splitext(n)[1].lower() in VIDEO_EXTENSIONS for n in names):
        return VideoFolderSource(uri, frame_size=frame_size)
    usable = _data_folders_below(uri)
    if usable:
        raise CorpusError(
            f"{uri}: holds no corpus, .npz or video files itself, but these folders below it do: "
            + ", ".join(storage.join(uri, f) for f in usable[:8]) + (f" (and {len(usable) - 8} more)" if len(usable) > 8 else "")
            + "; pass one of them as --corpus"
        )
    raise CorpusError(
        f"{uri}: not a lapo_ray corpus (no manifest.json), no LAPO .npz files and no video files"
        + (" (the folder is empty)" if not names else f" (found: {', '.join(sorted(names)[:5])})")
    )


def _data_folders_below(uri: str, max_depth: int = 2) -> list[str]:
    """Sub-folders (relative) that ``open_source`` would accept: e.g. ``bigfish/train`` under the
    root of the official LAPO expert data, or ``train`` under one game's folder."""
    folders = set()
    for rel in storage.list_files_below(uri, max_depth):
        folder, name = posixpath.split(rel)
        if folder and (name == "manifest.json" or name.endswith(".npz")
                       or os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS):
            folders.add(folder)
    # A corpus's own shards/ folder is part of the corpus above it, not a corpus of its own.
    folders = {f for f in folders if not any(f.startswith(g + "/") for g in folders)}
    # One game's train/ and test/ read as one corpus from the game's folder (LapoGameSource).
    games = {posixpath.dirname(f) for f in folders if posixpath.basename(f) == "train"
             and posixpath.join(posixpath.dirname(f), "test") in folders}
    return sorted({f for f in folders if posixpath.dirname(f) not in games} | games)
