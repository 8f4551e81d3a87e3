"""Throughput benchmarks that print figures (speed targets live here, not in timed tests)."""

from __future__ import annotations

import time
from typing import Any

from lapo_ray import storage
from lapo_ray.config import CollectConfig, PipelineConfig


def ensure_bench_corpus(path: str, frames: int) -> str:
    from lapo_ray.data.collect import collect

    if not storage.exists(storage.join(path, "manifest.json")):
        print(f"collecting a {frames:,}-frame benchmark corpus into {path}", flush=True)
        collect(CollectConfig(out=path, frames=frames, num_workers=2, envs_per_worker=32, policy="random"))
    return path


def bench_data(corpus: str, frames: int = 200_000, batch_size: int = 128, max_batches: int | None = None,
               pipe: PipelineConfig | None = None) -> dict[str, Any]:
    """Triplets/s delivered to a consumer by the Ray Data pipeline vs a plain numpy reader."""
    from lapo_ray.data.sources import CorpusSource
    from lapo_ray.data.triplets import iter_plain_batches, torch_batches, triplet_dataset

    ensure_bench_corpus(corpus, frames)
    src = CorpusSource(corpus)
    n_total = src.manifest.num_triplets
    pipe = pipe or PipelineConfig(val_fraction=0.0)

    def run(batches) -> dict[str, float]:
        """Whole-pass rate (start-up included) and steady rate (after the first batch)."""
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

    results: dict[str, Any] = {"corpus_frames": src.manifest.num_frames, "corpus_triplets": n_total,
                               "batch_size": batch_size}
    results["plain"] = run(iter_plain_batches(src, "all", batch_size))
    for mode in ("files", "none", "segments"):
        cfg = PipelineConfig(**{**pipe.__dict__, "global_shuffle": mode})
        results[f"ray_{mode}"] = run(torch_batches(triplet_dataset(src, "all", cfg), src.frame_shape, batch_size, cfg))
    return results
