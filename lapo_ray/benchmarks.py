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
    # Start Ray Data's worker processes once, so the first mode measured does not pay for it.
    warm = PipelineConfig(global_shuffle="none", local_shuffle_buffer=0)
    next(iter(torch_batches(triplet_dataset(src, "all", warm, src.scan_files()[:1]), src.frame_shape, batch_size, warm)))
    for mode in ("files", "none", "segments"):
        cfg = PipelineConfig(**{**pipe.__dict__, "global_shuffle": mode})
        results[f"ray_{mode}"] = run(torch_batches(triplet_dataset(src, "all", cfg), src.frame_shape, batch_size, cfg))
    return results


def _plain_stage1_rates(model_cfg, stage, batches, steps: int, window: int, warmup: int) -> list[float]:
    """Samples/s per window of ``window`` steps of a plain single-process loop: the training step
    ``run_stage`` runs (``StageStep``), batches already in memory, no Ray.
    Windows ending at or before step ``warmup`` are dropped, as for Ray Train's reports."""
    import os

    import torch

    from lapo_ray.train.stages import Stage1Task
    from lapo_ray.train.step import StageStep, make_optimizer, to_channels_last

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


def _summary(rates: list[float]) -> dict[str, float]:
    import numpy as np

    q1, med, q3 = np.percentile(rates, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "windows": len(rates)}


def bench_stage1(corpus: str, preset: str = "cpu", steps: int = 200, batch_size: int = 64,
                 frames: int = 200_000, rounds: int = 2, window: int = 20, warmup: int = 40) -> dict[str, Any]:
    """Stage-1 samples/s: a plain single-process PyTorch loop over in-memory batches (the
    reference: model and optimiser only) vs Ray Train with 1 and 2 workers on the Ray Data
    pipeline.

    Throughput on a small shared machine drifts by +-20% from minute to minute, so one figure
    per mode says little. The modes run ``rounds`` times, interleaved (plain, 1 worker, 2 workers,
    plain, ...), each timed in windows of ``window`` steps; the first ``warmup`` steps of every
    run (start-up, first reads) are dropped, and each mode reports the median window and its
    quartiles."""
    import dataclasses
    import tempfile

    import torch

    from lapo_ray.config import PRETRAIN_PRESETS, WandbConfig
    from lapo_ray.data.sources import CorpusSource
    from lapo_ray.data.triplets import SplitSpec, iter_plain_batches, triplet_dataset
    from lapo_ray.train.step import use_bf16
    from lapo_ray.train.metrics import MetricsSink, read_metrics
    from lapo_ray.train.stages import Stage1Task
    from lapo_ray.train.trainer import fit_stage

    if steps <= warmup or window <= 0 or rounds < 1:
        raise ValueError(f"stage-1 benchmark: steps ({steps}) must exceed warmup ({warmup}); "
                         f"window ({window}) and rounds ({rounds}) must be positive")
    ensure_bench_corpus(corpus, frames)
    src = CorpusSource(corpus)
    cfg = PRETRAIN_PRESETS[preset]()
    stage = dataclasses.replace(cfg.stage1, batch_size=batch_size, steps=steps, report_every=window,
                                checkpoint_every=steps, val_batches=1, time_budget_min=0)
    batches = []
    for b in iter_plain_batches(src, "train", batch_size, SplitSpec(cfg.data.val_fraction, cfg.data.split_seed)):
        batches.append(torch.from_numpy(b["frames"]))
        if len(batches) == 16:
            break

    def ray_rates(workers: int) -> tuple[list[float], list[float]]:
        st = dataclasses.replace(stage, num_workers=workers, cpus_per_worker=1.0 / workers)
        with tempfile.TemporaryDirectory() as out:
            sink = MetricsSink(out, "stage1", WandbConfig(mode="disabled"), {})
            fit_stage(Stage1Task(cfg.model), st, cfg.data, triplet_dataset(src, "train", cfg.data),
                      triplet_dataset(src, "val", dataclasses.replace(cfg.data, global_shuffle="none")),
                      out, {}, sink)
            rows = [r for r in read_metrics(out, "stage1") if r["step"] > warmup]
        return [r["samples_per_s"] for r in rows], [r["data_wait_frac"] for r in rows]

    rates: dict[str, list[float]] = {"plain": [], "ray_1w": [], "ray_2w": []}
    wait: dict[str, list[float]] = {"ray_1w": [], "ray_2w": []}
    for r in range(rounds):
        print(f"stage-1 benchmark round {r + 1}/{rounds}: plain loop", flush=True)
        rates["plain"] += _plain_stage1_rates(cfg.model, stage, batches, steps, window, warmup)
        for workers in (1, 2):
            print(f"stage-1 benchmark round {r + 1}/{rounds}: Ray Train, {workers} worker(s)", flush=True)
            got, w = ray_rates(workers)
            rates[f"ray_{workers}w"] += got
            wait[f"ray_{workers}w"] += w
    results: dict[str, Any] = {
        "preset": preset, "batch_size": batch_size, "steps": steps, "rounds": rounds, "window": window,
        "precision": "bf16" if use_bf16(stage, torch.device("cpu")) else "fp32",
        "window_samples_per_s": rates,
    }
    for mode, xs in rates.items():
        results[mode] = _summary(xs)
        if mode in wait:
            results[mode]["data_wait_frac"] = float(sum(wait[mode]) / max(1, len(wait[mode])))
    return results


def bench_env_runners(envs_per_runner: int = 16, rollout_length: int = 64, iterations: int = 4,
                      runner_counts: tuple[int, ...] = (1, 2), raw_steps: int = 200,
                      cpus: int | None = None, rounds: int = 1, num_epochs: int | None = None) -> dict[str, Any]:
    """Environment steps/s: the Procgen vector env alone (random actions, one process: the ceiling)
    beside RLlib PPO sampling with 1 and 2 env runners, each stepping ``envs_per_runner`` envs with
    the cpu-preset agent (from scratch, so no pretrain folder is needed).

    With ``cpus``, N runners get ``cpus // N`` CPUs each (at least 1); otherwise the cpu preset's
    share. Sampling and learner seconds are each iteration's own (``IterationTimes``), not
    RLlib's smoothed timers."""
    import numpy as np

    from lapo_ray.config.rl import cpu_finetune
    from lapo_ray.envs import NUM_ACTIONS, make_procgen_vector_env
    from lapo_ray.rl.algo import IterationTimes, build_algorithm_config, sampled_env_steps

    out: dict[str, Any] = {"envs_per_runner": envs_per_runner, "rollout_length": rollout_length}
    env = make_procgen_vector_env({"game": "coinrun", "num_envs": envs_per_runner, "num_threads": 1})
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(raw_steps):
        env.step(rng.integers(0, NUM_ACTIONS, envs_per_runner))
    out["raw_vector_env_steps_per_s"] = raw_steps * envs_per_runner / (time.perf_counter() - t0)
    env.close()
    runs: dict[int, dict[str, list[float]]] = {n: {"sample_s": [], "learn_s": [], "iter_s": [], "steps": []}
                                              for n in runner_counts}
    cpus_per_runner: dict[int, float] = {}
    # Rounds interleave the runner counts, so a shared machine's drift hits every mode alike.
    for _ in range(rounds):
        for n in runner_counts:
            cfg = cpu_finetune()
            cfg.scratch, cfg.num_env_runners, cfg.envs_per_runner = True, n, envs_per_runner
            # Each runner holds an equal share of the machine's CPUs; its torch threads follow.
            cfg.cpus_per_env_runner = max(1.0, float(cpus // n)) if cpus else cfg.cpus_per_env_runner
            cpus_per_runner[n] = cfg.cpus_per_env_runner
            cfg.ppo.rollout_length = rollout_length
            cfg.ppo.num_minibatches = 4
            cfg.ppo.num_epochs = num_epochs or cfg.ppo.num_epochs
            algo = build_algorithm_config(cfg).build_algo()
            try:
                algo.train()  # warm-up: worker start, first weights sync
                timer = IterationTimes(algo)
                for _ in range(iterations):
                    steps0 = sampled_env_steps(algo)
                    timer.reset()
                    t = time.perf_counter()
                    algo.train()
                    r = runs[n]
                    r["iter_s"].append(time.perf_counter() - t)
                    r["sample_s"].append(timer.get("sample"))
                    r["learn_s"].append(timer.get("learn"))
                    r["steps"].append(sampled_env_steps(algo) - steps0)
            finally:
                algo.stop()
    for n, r in runs.items():
        rates = [st / s for st, s in zip(r["steps"], r["sample_s"])]
        out[f"rllib_{n}_runners"] = {
            "sampling_env_steps_per_s": sum(r["steps"]) / sum(r["sample_s"]),
            "sampling_env_steps_per_s_median": float(np.median(rates)),
            "sampling_env_steps_per_s_per_iteration": rates,
            "iteration_env_steps_per_s": sum(r["steps"]) / sum(r["iter_s"]),
            "env_steps": sum(r["steps"]),
            "cpus_per_env_runner": cpus_per_runner[n],
            "sample_seconds": r["sample_s"],
            "learn_seconds": r["learn_s"],
        }
    return out
