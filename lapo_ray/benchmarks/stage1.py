"""Stage-1 samples/s: a plain single-process PyTorch loop vs Ray Train with 1 and 2 workers
(``jobs/benchmark.py stage1``; the step alone, without Ray, is ``jobs/benchmark.py step``)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from lapo_ray import UsageError
from lapo_ray.benchmarks.corpora import ensure_bench_corpus
from lapo_ray.config import PRETRAIN_PRESETS, Stage1BenchConfig, WandbConfig
from lapo_ray.data.sources import CorpusSource
from lapo_ray.data.triplets import SplitSpec, iter_plain_batches, triplet_dataset
from lapo_ray.train.metrics import MetricsSink, read_metrics
from lapo_ray.train.stages import Stage1Task
from lapo_ray.train.step import StageStep, make_optimizer, to_channels_last, use_bf16
from lapo_ray.train.trainer import fit_stage

RAY_WORKERS = (1, 2)


def plain_stage1_rates(model_cfg, stage, batches, steps: int, window: int, warmup: int) -> list[float]:
    """Samples/s per window of ``window`` steps of a plain single-process loop: the training step
    ``run_stage`` runs (``StageStep``), batches already in memory, no Ray.
    Windows ending at or before step ``warmup`` are dropped, as for Ray Train's reports."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    device = torch.device("cpu")
    task = Stage1Task(model_cfg)
    model = to_channels_last(task.build())
    train_step = StageStep(task, model, make_optimizer(model, stage, device), stage, device)
    rates, t0 = [], time.perf_counter()
    for step in range(steps):
        train_step({"frames": batches[step % len(batches)]}, step)
        if (step + 1) % window == 0:
            train_step.take_means()  # what a report reads, as in run_stage
            now = time.perf_counter()
            if step + 1 > warmup:
                rates.append(window * stage.batch_size / (now - t0))
            t0 = now
    return rates


def _ray_stage1_rates(src, cfg, stage, workers: int, warmup: int) -> tuple[list[float], list[float]]:
    """Samples/s and data-wait fraction of every report after step ``warmup`` of a stage-1 run on
    Ray Train with ``workers`` workers sharing one CPU."""
    worker_stage = dataclasses.replace(stage, num_workers=workers, cpus_per_worker=1.0 / workers)
    with tempfile.TemporaryDirectory() as out:
        sink = MetricsSink(out, "stage1", WandbConfig(mode="disabled"), {})
        fit_stage(Stage1Task(cfg.model), worker_stage, cfg.data, triplet_dataset(src, "train", cfg.data),
                  triplet_dataset(src, "val", dataclasses.replace(cfg.data, global_shuffle="none")),
                  out, {}, sink)
        rows = [r for r in read_metrics(out, "stage1") if r["step"] > warmup]
    return [r["samples_per_s"] for r in rows], [r["data_wait_frac"] for r in rows]


def _in_memory_batches(src, cfg, batch_size: int, count: int = 16) -> list:
    """The first ``count`` training batches of the corpus as torch tensors, for the plain loop."""
    batches = []
    for b in iter_plain_batches(src, "train", batch_size, SplitSpec(cfg.data.val_fraction, cfg.data.split_seed)):
        batches.append(torch.from_numpy(b["frames"]))
        if len(batches) == count:
            break
    return batches


def summarise_rates(rates: list[float]) -> dict[str, float]:
    """Median window and its quartiles."""
    q1, med, q3 = np.percentile(rates, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "windows": len(rates)}


def bench_stage1(corpus: str, preset: str = "cpu", steps: int = 200, batch_size: int = 64,
                 frames: int = 200_000, rounds: int = 2, window: int = 20, warmup: int = 40) -> dict[str, Any]:
    """Stage-1 samples/s: a plain single-process PyTorch loop over in-memory batches (the
    reference: model and optimiser only) vs Ray Train with 1 and 2 workers on the Ray Data
    pipeline.

    Throughput on a small shared machine drifts from minute to minute (measured:
    docs/results/benchmark-notes.md), so one figure per mode says little. The modes run
    ``rounds`` times, interleaved (plain, 1 worker, 2 workers, plain, ...), each timed in windows
    of ``window`` steps; the first ``warmup`` steps of every run (start-up, first reads) are
    dropped, and each mode reports the median window and its quartiles."""
    if steps <= warmup or window <= 0 or rounds < 1:
        raise UsageError(f"stage-1 benchmark: steps ({steps}) must exceed warmup ({warmup}); "
                         f"window ({window}) and rounds ({rounds}) must be positive")
    ensure_bench_corpus(corpus, frames)
    src = CorpusSource(corpus)
    cfg = PRETRAIN_PRESETS[preset]()
    stage = dataclasses.replace(cfg.stage1, batch_size=batch_size, steps=steps, report_every=window,
                                checkpoint_every=steps, val_batches=1, time_budget_min=0)
    batches = _in_memory_batches(src, cfg, batch_size)
    rates: dict[str, list[float]] = {"plain": [], **{f"ray_{w}w": [] for w in RAY_WORKERS}}
    wait: dict[str, list[float]] = {f"ray_{w}w": [] for w in RAY_WORKERS}
    for r in range(rounds):
        print(f"stage-1 benchmark round {r + 1}/{rounds}: plain loop", flush=True)
        rates["plain"] += plain_stage1_rates(cfg.model, stage, batches, steps, window, warmup)
        for workers in RAY_WORKERS:
            print(f"stage-1 benchmark round {r + 1}/{rounds}: Ray Train, {workers} worker(s)", flush=True)
            got, w = _ray_stage1_rates(src, cfg, stage, workers, warmup)
            rates[f"ray_{workers}w"] += got
            wait[f"ray_{workers}w"] += w
    results: dict[str, Any] = {
        "preset": preset, "batch_size": batch_size, "steps": steps, "rounds": rounds, "window": window,
        "precision": "bf16" if use_bf16(stage, torch.device("cpu")) else "fp32",
        "window_samples_per_s": rates,
    }
    for mode, xs in rates.items():
        results[mode] = summarise_rates(xs)
        if mode in wait:
            results[mode]["data_wait_frac"] = float(sum(wait[mode]) / max(1, len(wait[mode])))
    return results


def run(cfg: Stage1BenchConfig) -> dict[str, Any]:
    return bench_stage1(cfg.corpus, cfg.preset, cfg.steps, cfg.batch_size, rounds=cfg.rounds)


def report(r: dict[str, Any]) -> str:
    """What ``jobs/benchmark.py stage1`` prints: the summary as JSON (not every window), then a
    line a mode."""
    plain = r["plain"]["median"]
    lines = [json.dumps({k: v for k, v in r.items() if k != "window_samples_per_s"}, indent=2), "",
             f"stage 1, {r['preset']} preset, batch {r['batch_size']}, {r['precision']}; median (quartiles) of "
             f"{r['window']}-step windows over {r['rounds']} interleaved rounds",
             f"plain PyTorch loop (no Ray):  {plain:8.1f} samples/s ({r['plain']['q1']:.0f}-{r['plain']['q3']:.0f})"]
    for w in RAY_WORKERS:
        x = r[f"ray_{w}w"]
        lines.append(f"Ray Train, {w} worker(s):      {x['median']:8.1f} samples/s ({x['q1']:.0f}-{x['q3']:.0f}) "
                     f"= {x['median'] / plain:.2f} x plain (data wait {100 * x['data_wait_frac']:.1f}%)")
    return "\n".join(lines)
