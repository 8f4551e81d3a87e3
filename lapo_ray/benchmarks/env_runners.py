"""Environment steps/s: the Procgen vector env alone vs RLlib PPO sampling with 1 and 2 env
runners (``jobs/benchmark.py envrunners``)."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from lapo_ray.config import EnvRunnersBenchConfig
from lapo_ray.config.rl import cpu_finetune
from lapo_ray.envs import NUM_ACTIONS, make_procgen_vector_env
from lapo_ray.rl.algo import IterationTimes, build_algorithm_config, sampled_env_steps


def raw_vector_env_steps_per_s(num_envs: int, steps: int) -> float:
    """Steps/s of the Procgen vector env alone, random actions, in this process: the ceiling."""
    env = make_procgen_vector_env({"game": "coinrun", "num_envs": num_envs, "num_threads": 1})
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(rng.integers(0, NUM_ACTIONS, num_envs))
    rate = steps * num_envs / (time.perf_counter() - t0)
    env.close()
    return rate


def _runner_config(runners: int, envs_per_runner: int, rollout_length: int, cpus: int | None,
                   num_epochs: int | None):
    """The cpu preset's fine-tuning config, from scratch, with ``runners`` env runners."""
    cfg = cpu_finetune()
    cfg.scratch, cfg.num_env_runners, cfg.envs_per_runner = True, runners, envs_per_runner
    # Each runner holds an equal share of the machine's CPUs; its torch threads follow.
    cfg.cpus_per_env_runner = max(1.0, float(cpus // runners)) if cpus else cfg.cpus_per_env_runner
    cfg.ppo.rollout_length = rollout_length
    cfg.ppo.num_minibatches = 4
    cfg.ppo.num_epochs = num_epochs or cfg.ppo.num_epochs
    return cfg


def _time_iterations(cfg, iterations: int, into: dict[str, list[float]]) -> None:
    """Build the algorithm, train once to warm it up, then append each timed iteration's whole,
    sampling and learner seconds and its env steps to ``into``."""
    algo = build_algorithm_config(cfg).build_algo()
    try:
        algo.train()  # warm-up: worker start, first weights sync
        timer = IterationTimes(algo)
        for _ in range(iterations):
            steps0 = sampled_env_steps(algo)
            timer.reset()
            t = time.perf_counter()
            algo.train()
            into["iter_s"].append(time.perf_counter() - t)
            into["sample_s"].append(timer.get("sample"))
            into["learn_s"].append(timer.get("learn"))
            into["steps"].append(sampled_env_steps(algo) - steps0)
    finally:
        algo.stop()


def _runner_summary(r: dict[str, list[float]], cpus_per_env_runner: float) -> dict[str, Any]:
    rates = [st / s for st, s in zip(r["steps"], r["sample_s"])]
    return {
        "sampling_env_steps_per_s": sum(r["steps"]) / sum(r["sample_s"]),
        "sampling_env_steps_per_s_median": float(np.median(rates)),
        "sampling_env_steps_per_s_per_iteration": rates,
        "iteration_env_steps_per_s": sum(r["steps"]) / sum(r["iter_s"]),
        "env_steps": sum(r["steps"]),
        "cpus_per_env_runner": cpus_per_env_runner,
        "sample_seconds": r["sample_s"],
        "learn_seconds": r["learn_s"],
    }


def bench_env_runners(envs_per_runner: int = 16, rollout_length: int = 64, iterations: int = 4,
                      runner_counts: tuple[int, ...] = (1, 2), raw_steps: int = 200,
                      cpus: int | None = None, rounds: int = 1, num_epochs: int | None = None) -> dict[str, Any]:
    """Environment steps/s: the Procgen vector env alone (random actions, one process: the ceiling)
    beside RLlib PPO sampling with 1 and 2 env runners, each stepping ``envs_per_runner`` envs with
    the cpu-preset agent (from scratch, so no pretrain folder is needed).

    With ``cpus``, N runners get ``cpus // N`` CPUs each (at least 1); otherwise the cpu preset's
    share. Sampling and learner seconds are each iteration's own (``IterationTimes``), not
    RLlib's smoothed timers."""
    out: dict[str, Any] = {"envs_per_runner": envs_per_runner, "rollout_length": rollout_length,
                           "raw_vector_env_steps_per_s": raw_vector_env_steps_per_s(envs_per_runner, raw_steps)}
    runs: dict[int, dict[str, list[float]]] = {n: {"sample_s": [], "learn_s": [], "iter_s": [], "steps": []}
                                              for n in runner_counts}
    cpus_per_runner: dict[int, float] = {}
    # Rounds interleave the runner counts, so a shared machine's drift hits every mode alike.
    for _ in range(rounds):
        for n in runner_counts:
            cfg = _runner_config(n, envs_per_runner, rollout_length, cpus, num_epochs)
            cpus_per_runner[n] = cfg.cpus_per_env_runner
            _time_iterations(cfg, iterations, runs[n])
    for n, r in runs.items():
        out[f"rllib_{n}_runners"] = _runner_summary(r, cpus_per_runner[n])
    return out


def run(cfg: EnvRunnersBenchConfig) -> dict[str, Any]:
    return bench_env_runners(cfg.envs_per_runner, cfg.rollout_length, cfg.iterations, cpus=cfg.cpus,
                             rounds=cfg.rounds, num_epochs=cfg.epochs)


def report(r: dict[str, Any]) -> str:
    """What ``jobs/benchmark.py envrunners`` prints: the figures as JSON, then a line a mode."""
    raw = r["raw_vector_env_steps_per_s"]
    lines = [json.dumps(r, indent=2), "",
             f"Procgen vector env alone ({r['envs_per_runner']} envs, random actions): {raw:,.0f} steps/s (ceiling)"]
    for n in (1, 2):
        x = r[f"rllib_{n}_runners"]
        lines.append(f"RLlib PPO, {n} env runner(s) x {r['envs_per_runner']} envs: sampling "
                     f"{x['sampling_env_steps_per_s']:,.0f} steps/s (median iteration "
                     f"{x['sampling_env_steps_per_s_median']:,.0f}) ({x['sampling_env_steps_per_s'] / raw:.2f} x raw), "
                     f"whole iteration incl. learning {x['iteration_env_steps_per_s']:,.0f} steps/s; per iteration "
                     f"sample {', '.join(f'{t:.2f}' for t in x['sample_seconds'])} s, "
                     f"learn {', '.join(f'{t:.2f}' for t in x['learn_seconds'])} s "
                     f"({x['cpus_per_env_runner']:g} CPU per runner)")
    return "\n".join(lines)
