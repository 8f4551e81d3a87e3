"""Triplets/s of the corpus held on the device beside the streaming pipeline's
(``jobs/benchmark.py resident``).

Both read the same corpus's training split, as a Train worker does: streaming cuts each pass from
Ray Data's segments through the shuffle buffer and copies the batches to the device (pinned, a
background thread ahead on GPUs); the held corpus (``--data.device-resident true``) reads the same
dataset once, then cuts every epoch by index on the device. The first figure of the held corpus
is its load (seconds and bytes), the rest are epochs after it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import torch

from lapo_ray.benchmarks.corpora import ensure_bench_corpus
from lapo_ray.benchmarks.data import timed_pass
from lapo_ray.config import PipelineConfig, ResidentBenchConfig
from lapo_ray.data.resident import hold_dataset
from lapo_ray.data.sources import CorpusSource
from lapo_ray.data.triplets import torch_batches, triplet_dataset


def _synced(batches: Iterator[dict], device: torch.device) -> Iterator[dict]:
    """The batches, with the device's queued work finished before the pass's clock stops (a
    gather on a GPU returns before it has run)."""
    for b in batches:
        yield b
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_resident(corpus: str, frames: int = 200_000, batch_size: int = 128, device: str = "cpu",
                   epochs: int = 2, pipe: PipelineConfig | None = None) -> dict[str, Any]:
    ensure_bench_corpus(corpus, frames)
    src = CorpusSource(corpus)
    pipe = pipe or PipelineConfig()
    dev = torch.device(device)
    shape = tuple(src.frame_shape)
    result: dict[str, Any] = {"corpus_frames": src.manifest.num_frames, "batch_size": batch_size,
                              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    result["streaming"] = timed_pass(_synced(torch_batches(triplet_dataset(src, "train", pipe), shape, batch_size,
                                                           pipe, device=dev), dev))
    t0 = time.perf_counter()
    held = hold_dataset(triplet_dataset(src, "train", pipe), shape, dev, pipe)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    result["resident_load"] = {"seconds": time.perf_counter() - t0, "bytes": held.nbytes, "triplets": len(held)}
    result["resident_epochs"] = [timed_pass(_synced(held.batches(batch_size, seed=pipe.shuffle_seed + e), dev))
                                 for e in range(epochs)]
    return result


def run(cfg: ResidentBenchConfig) -> dict[str, Any]:
    return bench_resident(cfg.corpus, cfg.frames, cfg.batch_size, cfg.device, cfg.epochs)


def report(r: dict[str, Any]) -> str:
    """What ``jobs/benchmark.py resident`` prints: the figures as JSON, then a line each."""
    stream, load = r["streaming"], r["resident_load"]
    lines = [json.dumps(r, indent=2), "",
             f"{r['corpus_frames']:,}-frame corpus, training split, batches of {r['batch_size']} on {r['device']}",
             f"streaming (Ray Data, shuffle buffer, copy to the device): {stream['triplets_per_s']:,.0f} triplets/s "
             f"(steady {stream['steady_triplets_per_s']:,.0f}/s after a first batch at "
             f"{stream['first_batch_s']:.1f} s)",
             f"held on the device: loaded {load['triplets']:,} triplets ({load['bytes'] / 2**20:,.0f} MiB) in "
             f"{load['seconds']:.1f} s"]
    for i, e in enumerate(r["resident_epochs"]):
        lines.append(f"  epoch {i + 1}: {e['triplets_per_s']:,.0f} triplets/s = "
                     f"{e['triplets_per_s'] / stream['triplets_per_s']:.1f} x streaming")
    return "\n".join(lines)
