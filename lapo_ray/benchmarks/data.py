"""Triplets/s of the Ray Data pipeline vs a plain numpy reader (``jobs/benchmark.py data``)."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from lapo_ray.benchmarks.corpora import ensure_bench_corpus
from lapo_ray.config import DataBenchConfig, PipelineConfig
from lapo_ray.data.sources import CorpusSource
from lapo_ray.data.triplets import iter_plain_batches, torch_batches, triplet_dataset

SHUFFLE_MODES = ("files", "none", "segments")


def timed_pass(batches: Iterable[dict], max_batches: int | None = None) -> dict[str, float]:
    """Whole-pass rate (start-up included) and steady rate (after the first batch) of a stream
    of triplet batches, read to its end or for ``max_batches``."""
    t0, n, first, t1 = time.perf_counter(), 0, 0, None
    for i, b in enumerate(batches):
        if t1 is None:
            t1, first = time.perf_counter(), len(b["step"])
        n += len(b["step"])
        if max_batches and i + 1 >= max_batches:
            break
    end = time.perf_counter()
    return {"triplets": n, "triplets_per_s": n / (end - t0),
            "steady_triplets_per_s": (n - first) / max(end - t1, 1e-9), "first_batch_s": t1 - t0}


def bench_data(corpus: str, frames: int = 200_000, batch_size: int = 128, max_batches: int | None = None,
               pipe: PipelineConfig | None = None) -> dict[str, Any]:
    """Triplets/s delivered to a consumer by the Ray Data pipeline, in each global-shuffle mode,
    vs a plain numpy reader. A missing ``corpus`` is collected (``frames`` frames)."""
    ensure_bench_corpus(corpus, frames)
    src = CorpusSource(corpus)
    pipe = pipe or PipelineConfig(val_fraction=0.0)
    results: dict[str, Any] = {"corpus_frames": src.manifest.num_frames, "corpus_triplets": src.manifest.num_triplets,
                               "batch_size": batch_size}
    results["plain"] = timed_pass(iter_plain_batches(src, "all", batch_size), max_batches)
    # Start Ray Data's worker processes once, so the first mode measured does not pay for it.
    warm = PipelineConfig(global_shuffle="none", local_shuffle_buffer=0)
    next(iter(torch_batches(triplet_dataset(src, "all", warm, src.scan_files()[:1]), src.frame_shape, batch_size, warm)))
    for mode in SHUFFLE_MODES:
        cfg = PipelineConfig(**{**pipe.__dict__, "global_shuffle": mode})
        results[f"ray_{mode}"] = timed_pass(
            torch_batches(triplet_dataset(src, "all", cfg), src.frame_shape, batch_size, cfg), max_batches)
    return results


def run(cfg: DataBenchConfig) -> dict[str, Any]:
    return bench_data(cfg.corpus, cfg.frames, cfg.batch_size)


def report(r: dict[str, Any]) -> str:
    """What ``jobs/benchmark.py data`` prints: the figures as JSON, then a line a reader."""
    plain = r["plain"]["triplets_per_s"]
    lines = [json.dumps(r, indent=2), "",
             f"{r['corpus_frames']:,}-frame corpus, batches of {r['batch_size']}",
             f"plain numpy reader: {plain:,.0f} triplets/s"]
    for mode in SHUFFLE_MODES:
        x = r[f"ray_{mode}"]
        lines.append(f"Ray Data pipeline (global shuffle={mode}): {x['triplets_per_s']:,.0f} triplets/s "
                     f"= {x['triplets_per_s'] / plain:.2f} x plain (steady {x['steady_triplets_per_s']:,.0f}/s "
                     f"after a first batch at {x['first_batch_s']:.1f} s)")
    return "\n".join(lines)
