"""Several corpora in one run: ``--corpus A,B`` (proportional to size) or ``--corpus A=0.7,B=0.3``.

Each entry of the comma list is a source ``open_source`` accepts (a corpus, a LAPO npz folder, a
video folder; path or URI), optionally followed by ``=W``, a positive number: the source's share
of the training triplets (weights are normalised, so ``A=7,B=3`` is the same). Give every entry a
weight or none. A weight is only ever read from a trailing ``=<number>``, so URIs with ``:`` or a
query (``s3://b/c?endpoint_override=host:9000``) pass unchanged; a path whose own name ends in
``=<number>`` must be given a weight of its own after it (a local folder that exists as written is
always one source). One entry is one source exactly as before.

``MultiSource`` makes the sources one ``Source``:

* **Episode ids** get the source's index in their top bits (``index << SOURCE_BITS``), so ids of
  two sources never meet; the first source keeps its own ids.
* **Files** are named ``<file>#<index>`` (two corpora both hold ``shards/w000-00000.parquet``),
  so every file, and the latent shard labelling writes for it, is the file of one source.
* **Splits** are made per source (``MultiSource.split``), by the same rule and seed as for one
  source (``SplitSpec.for_episodes``): every source validates on its own share of its own
  episodes, the very episodes it would validate on alone. ``source_parts`` and ``source_counts``
  give each source back with its files, split and counts (the per-source probe and report).
* **Triplets** are cut within a segment, a segment lies within one file, a file within one
  source: no triplet mixes sources.
* **The training stream** (``stream_files(..., weighted=True)``) is one epoch of files: the
  shortest stream in which every source is read whole at least once and each source's share of
  the (estimated) training triplets is its weight. A source whose share exceeds its size is read
  several times, each pass in a fresh seeded order, its last pass in part; the sources' files are
  interleaved evenly over the epoch (each file at the middle of its triplets' share of its
  source's quota), so every stretch of the stream holds the sources in their proportions, up to a
  file of each and the consumer's shuffle buffer. Without weights each file is read once: the
  shares are the sizes. Validation, the probe and labelling read each file once.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from lapo_ray import UsageError
from lapo_ray.data.corpus import SEGMENT_SCHEMA
from lapo_ray.data.sources import OnBad, ScanReport, Source, SourcePart, open_source
from lapo_ray.data.splits import SplitSpec

SOURCE_BITS = 56
MAX_SOURCES = 64  # ids stay below 2**62
_WEIGHT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", re.IGNORECASE)


@dataclass(frozen=True)
class CorpusEntry:
    uri: str
    weight: float | None = None


def parse_corpus(text: str) -> list[CorpusEntry]:
    """``--corpus`` as a list of sources with optional weights (see the module's doc)."""
    text = text.strip()
    if not text:
        raise UsageError("--corpus: empty")
    if ("," not in text and "=" not in text) or ("://" not in text and os.path.exists(text)):
        return [CorpusEntry(text)]  # a local folder that exists as written is one, whatever its name
    entries = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise UsageError(f"--corpus {text}: an empty entry (a comma too many)")
        uri, weight = item, None
        head, sep, tail = item.rpartition("=")
        if sep and _WEIGHT.fullmatch(tail.strip()):
            uri, weight = head.strip(), float(tail)
            if not uri:
                raise UsageError(f"--corpus {text}: '{item}' is a weight without a source")
            if not (math.isfinite(weight) and weight > 0):
                raise UsageError(f"--corpus {text}: {uri} has weight {tail.strip()}; a weight is a positive "
                                 "number (DIR=0.7)")
        entries.append(CorpusEntry(uri, weight))
    weighted = [e.uri for e in entries if e.weight is not None]
    if weighted and len(weighted) != len(entries):
        missing = [e.uri for e in entries if e.weight is None]
        raise UsageError(f"--corpus {text}: give every source a weight or none ({', '.join(missing)} has none)")
    seen: set[str] = set()
    for e in entries:
        key = e.uri.rstrip("/")
        if key in seen:
            raise UsageError(f"--corpus {text}: {e.uri} is given twice")
        seen.add(key)
    if len(entries) > MAX_SOURCES:
        raise UsageError(f"--corpus: {len(entries)} sources; at most {MAX_SOURCES}")
    return entries


def open_corpus_sources(text: str, frame_size: tuple[int, int] = (64, 64)) -> Source:
    """The source ``--corpus`` names: one as ``open_source`` opens it, several as a ``MultiSource``."""
    entries = parse_corpus(text)
    if len(entries) == 1:
        return open_source(entries[0].uri, frame_size=frame_size)
    parts = [open_source(e.uri, frame_size=frame_size) for e in entries]
    weights = [e.weight for e in entries] if entries[0].weight is not None else None
    return MultiSource(parts, weights, labels=[e.uri for e in entries])


def global_id(index: int, episode_id) -> Any:
    return (np.int64(index) << np.int64(SOURCE_BITS)) | np.asarray(episode_id, np.int64)


def file_id(path: str, index: int) -> str:
    return f"{path}#{index}"


class MultiSource(Source):
    """Several sources of one frame shape read as one (see the module's doc)."""

    kind = "multi"

    def __init__(self, parts: Sequence[Source], weights: Sequence[float] | None = None,
                 labels: Sequence[str] | None = None):
        if len(parts) < 2:
            raise ValueError("a MultiSource needs at least two sources")
        if len(parts) > MAX_SOURCES:
            raise ValueError(f"{len(parts)} sources; at most {MAX_SOURCES}")
        self.parts = list(parts)
        self.labels = list(labels) if labels is not None else [p.name for p in parts]
        shape = tuple(parts[0].frame_shape)
        for p in parts[1:]:
            if tuple(p.frame_shape) != shape:
                raise UsageError(f"--corpus: {parts[0].name} has frames {shape} but {p.name} has "
                                 f"{tuple(p.frame_shape)} (H, W, C); every source must have the same frame shape")
        if weights is not None:
            if len(weights) != len(parts) or any(not (math.isfinite(w) and w > 0) for w in weights):
                raise ValueError(f"weights {list(weights)}: one positive number per source")
            total = float(sum(weights))
            weights = [w / total for w in weights]
        self.weights = None if weights is None else list(weights)
        self.frame_shape = shape
        self.has_actions = any(p.has_actions for p in parts)
        self.name = "multi:" + ",".join(
            p.name if self.weights is None else f"{p.name}={w:.3g}" for p, w in zip(parts, self.weights or parts))
        self._files = {file_id(f, i): (i, f) for i, p in enumerate(parts) for f in p.scan_files()}
        self.scans: list[ScanReport] | None = None

    # ------------------------------------------------------------------ scanning and splits

    def file_stem(self, path: str) -> str:
        """The part's own stem of the file, with the part's index: two sources may name files alike."""
        index, own = self._files[path]
        return f"{self.parts[index].file_stem(own)}#{index}"

    def scan(self, on_bad: OnBad = "raise") -> ScanReport:
        scans = [p.scan(on_bad) for p in self.parts]
        for p, s in zip(self.parts, scans):
            if s.episode_ids and not (0 <= min(s.episode_ids) and max(s.episode_ids) < 2**SOURCE_BITS):
                raise UsageError(f"{p.name}: episode ids must lie in [0, 2**{SOURCE_BITS}) to be combined "
                                 "with other sources")
        self.scans = scans
        return ScanReport(
            files=[file_id(f, i) for i, s in enumerate(scans) for f in s.files],
            frames=sum(s.frames for s in scans),
            episodes=sum(s.episodes for s in scans),
            triplets=sum(s.triplets for s in scans),
            bad_files=[b for s in scans for b in s.bad_files],
            episode_ids=[int(global_id(i, e)) for i, s in enumerate(scans) for e in s.episode_ids],
            file_triplets=[n for s in scans for n in s.file_triplets],
            episode_triplets=[n for s in scans for n in s.episode_triplets],
        )

    def _scans(self) -> list[ScanReport]:
        if self.scans is None:
            self.scan()
        return self.scans

    def split(self, scan: ScanReport, val_fraction: float, seed: int) -> SplitSpec:
        """Each source's episodes in ``scan`` (this source's scan) split on their own, in its own
        ids, by ``SplitSpec.for_episodes``: one spec of all the sources' validation episodes."""
        ids = np.asarray(scan.episode_ids, np.int64)
        val = []
        for i in range(len(self.parts)):
            own = ids[(ids >> SOURCE_BITS) == i] - (np.int64(i) << np.int64(SOURCE_BITS))
            val += [int(global_id(i, e)) for e in SplitSpec.for_episodes(own, val_fraction, seed).val_episodes]
        return SplitSpec(val_fraction, seed, tuple(sorted(val)))

    def part_spec(self, index: int, spec: SplitSpec) -> SplitSpec:
        """``spec`` restricted to source ``index``, in that source's own episode ids."""
        if spec.val_episodes is None:
            raise ValueError("a split of several sources lists its validation episodes (MultiSource.split)")
        lo, hi = index << SOURCE_BITS, (index + 1) << SOURCE_BITS
        return SplitSpec(spec.val_fraction, spec.seed,
                         tuple(e - lo for e in spec.val_episodes if lo <= e < hi))

    def part_files(self, index: int, files: Sequence[str]) -> list[str]:
        """The files of source ``index`` among ``files``, as that source names them."""
        return [self._files[f][1] for f in files if self._files[f][0] == index]

    def source_parts(self, files: list[str], spec: SplitSpec) -> list[SourcePart]:
        return [SourcePart(label, part, self.part_files(i, files), self.part_spec(i, spec))
                for i, (part, label) in enumerate(zip(self.parts, self.labels))]

    def source_counts(self, spec: SplitSpec) -> list[dict[str, Any]]:
        """Per source: files, episodes and triplets, in all and per split."""
        rows = []
        for i, (p, s) in enumerate(zip(self.parts, self._scans())):
            val = set(self.part_spec(i, spec).val_episodes)
            val_triplets = sum(n for e, n in zip(s.episode_ids, s.episode_triplets) if e in val)
            rows.append({"source": self.labels[i], "name": p.name,
                         "weight": None if self.weights is None else round(self.weights[i], 6),
                         "files": len(s.files), "episodes": s.episodes, "val_episodes": len(val),
                         "frames": s.frames, "triplets": s.triplets,
                         "train_triplets": sum(s.episode_triplets) - val_triplets, "val_triplets": val_triplets,
                         "bad_files": len(s.bad_files), "has_actions": p.has_actions})
        return rows

    # ------------------------------------------------------------------ the stream of files

    def stream_files(self, files: Sequence[str], spec: SplitSpec | None, split: str, seed: int | None,
                     weighted: bool = False) -> list[str]:
        """The order (with repeats when ``weighted``) in which ``files`` are read for ``split``:
        the sources interleaved evenly; with a ``seed`` each source's files in a seeded random
        order, a fresh one per pass. See the module's doc for the epoch."""
        scans = self._scans()
        rng = np.random.default_rng(seed) if seed is not None else None
        size = {file_id(f, i): n for i, s in enumerate(scans) for f, n in zip(s.files, s.file_triplets)}
        by_part = [[f for f in files if self._files[f][0] == i] for i in range(len(self.parts))]
        share = [self._split_share(i, spec, split) for i in range(len(self.parts))]
        # A file's estimated triplets of the split: its triplets times its source's share.
        est = {f: max(size.get(f, 0), 0) * share[self._files[f][0]] for f in files}
        totals = [sum(est[f] for f in fs) for fs in by_part]
        if weighted and self.weights is not None:
            for i, (fs, t) in enumerate(zip(by_part, totals)):
                if fs and t <= 0:
                    raise UsageError(f"{self.parts[i].name}: no {split} triplets to weigh")
            live = [i for i, fs in enumerate(by_part) if fs]
            epoch = max(totals[i] / self.weights[i] for i in live)
            quotas = [self.weights[i] * epoch if by_part[i] else 0.0 for i in range(len(self.parts))]
        else:
            quotas = totals
        entries: list[tuple[float, int, int, str]] = []
        for i, fs in enumerate(by_part):
            if not fs:
                continue
            order = self._passes(fs, quotas[i], est, rng)
            got, done = sum(est[f] for f in order), 0.0
            for k, f in enumerate(order):
                # The file's place in the epoch: the middle of its triplets within its source's.
                place = (done + est[f] / 2) / got if got > 0 else (k + 0.5) / len(order)
                entries.append((place, i, k, f))
                done += est[f]
        return [f for *_, f in sorted(entries)]

    @staticmethod
    def _passes(files: list[str], quota: float, est: dict[str, float], rng) -> list[str]:
        """Whole passes over ``files`` (each in a fresh order) and the start of one more, until
        the files' triplets come nearest to ``quota``; at least one whole pass."""
        def one_pass():
            return [files[j] for j in rng.permutation(len(files))] if rng is not None else list(files)

        out, got = one_pass(), sum(est[f] for f in files)
        if got <= 0:
            return out
        limit = quota * (1 + 1e-9)
        while True:
            for f in one_pass():
                if got + est[f] / 2 > limit:
                    return out
                out.append(f)
                got += est[f]

    def _split_share(self, index: int, spec: SplitSpec | None, split: str) -> float:
        s = self._scans()[index]
        total = sum(s.episode_triplets)
        if split == "all" or spec is None or total <= 0:
            return 1.0
        val = self.part_spec(index, spec).val_episodes if spec.val_episodes is not None else None
        if val is None:
            return 1.0 - spec.val_fraction if split == "train" else spec.val_fraction
        vset = set(val)
        v = sum(n for e, n in zip(s.episode_ids, s.episode_triplets) if e in vset) / total
        return v if split == "val" else 1.0 - v

    # ------------------------------------------------------------------ reading

    def scan_files(self) -> list[str]:
        return list(self._files)

    def segments(self, files: list[str] | None = None):
        import ray.data  # lazy: jobs import this before they check their input (architecture.md, Imports)

        files = list(files or self.scan_files())
        lookup = {f: self._files[f] for f in set(files)}
        parts = self.parts

        def read_batch(batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
            for f in batch["path"]:
                i, path = lookup[str(f)]
                for table in parts[i].file_segments(path):
                    yield _tagged(table, i)

        return ray.data.from_items([{"path": f} for f in files]).map_batches(
            read_batch, batch_size=1, batch_format="numpy", num_cpus=1)

    def file_segments(self, path: str) -> Iterator[pa.Table]:
        i, real = self._files[path]
        for table in self.parts[i].file_segments(real):
            yield _tagged(table, i)


def _tagged(table: pa.Table, index: int) -> pa.Table:
    """Segment rows of source ``index``: its episode ids moved to its id range, in the segment schema."""
    for name in SEGMENT_SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, SEGMENT_SCHEMA.field(name).type))
    table = table.select(SEGMENT_SCHEMA.names)
    if index:
        ids = global_id(index, table.column("episode_id").to_numpy())
        table = table.set_column(0, "episode_id", pa.array(ids, pa.int64()))
    return table if table.schema.equals(SEGMENT_SCHEMA) else table.cast(SEGMENT_SCHEMA)
