"""The whole LAPO experiment on one game, step by step, resumable (``jobs/experiment.py``).

Each step writes ``<out>/steps/<name>.json`` when it has finished; a rerun skips finished steps,
and the steps themselves resume from their own checkpoints (collection, Ray Train, RLlib).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import time
from typing import Any, Callable

import numpy as np
import torch

from lapo_ray import UsageError, storage
from lapo_ray.config.experiment import ExperimentConfig
from lapo_ray.config.rl import DecodeConfig, EvalConfig, EvaluateConfig
from lapo_ray.data.collect import collect
from lapo_ray.data.corpus import read_actions
from lapo_ray.envs import NUM_ACTIONS
from lapo_ray.evaluation.experiment_report import render_experiment_report
from lapo_ray.evaluation.plots import plot_offline_decoding, plot_seed_curves
from lapo_ray.evaluation.reports import demo_norm
from lapo_ray.evaluation.rollout import evaluate_on_both_level_sets, evaluate_policy
from lapo_ray.evaluation.stats import curve_mean
from lapo_ray.pipelines.pretrain import run_pretrain
from lapo_ray.rl.algo import finetune
from lapo_ray.rl.decode import decode_offline
from lapo_ray.rl.evaluate import POLICY_FACTORIES, evaluate_agent
from lapo_ray.train.metrics import read_metrics

STEPS = ("demonstrator", "random", "collect", "majority", "pretrain", "finetune", "decode", "report")


def _marker(out: str, name: str) -> str:
    return storage.join(out, "steps", f"{name}.json")


def _step(out: str, name: str, fn, missing: list[str] | None = None) -> dict[str, Any] | None:
    """Run step ``name`` unless its marker exists. With ``missing`` (a report-only pass) nothing
    runs: an unfinished step is appended to it and gives None."""
    marker = _marker(out, name)
    if storage.exists(marker):
        print(f"experiment: step {name} already done", flush=True)
        return storage.read_json(marker)
    if missing is not None:
        missing.append(name)
        return None
    print(f"experiment: step {name} ...", flush=True)
    t0 = time.time()
    result = fn()
    result = {**result, "wall_seconds": result.get("wall_seconds", time.time() - t0)}
    storage.write_json(marker, result)
    return result


def versions() -> dict[str, str]:
    import ray  # lazy: importing Ray costs seconds, and a report-only pass never starts it

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "lapo_ray_commit": commit or "unknown", "machine": platform.machine(),
            "cpus": str(os.cpu_count())}


def run_experiment(cfg: ExperimentConfig, preset: str = "cpu") -> dict[str, Any]:
    """Run every unfinished step of the experiment in order (with ``cfg.report_only``, none), then
    write its report from all finished steps. Ray starts in the first step that needs it (the
    library's collect, run_pretrain, finetune and decode_offline start it after checking their
    input), so a report-only pass never starts it."""
    resolved = cfg.resolved()
    out = cfg.out
    storage.makedirs(out)
    storage.write_json(storage.join(out, "config.json"), cfg.to_dict())
    eval_cfg = resolved.eval
    results = {**_versions_of_the_run(out), "preset": preset}
    missing: list[str] | None = [] if cfg.report_only else None

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        return _step(out, name, fn, missing)

    results["demonstrator"] = step("demonstrator", lambda: _demonstrator(resolved, eval_cfg))
    results["random"] = step("random", lambda: _random_policy(resolved, eval_cfg))
    results["collect"] = step("collect", lambda: _collect(resolved))
    results["pretrain"] = step("pretrain", lambda: _pretrain(resolved))
    results["majority"] = step("majority", lambda: _majority(resolved, eval_cfg))
    results["finetune"] = _online_runs(cfg, resolved, eval_cfg, step)
    results["decode"] = _offline_runs(cfg, resolved, eval_cfg, step)
    if missing:
        basics = [name for name in ("demonstrator", "random", "collect", "pretrain") if name in missing]
        if basics:
            raise UsageError(f"{out}: nothing to report yet: step(s) {', '.join(basics)} not finished; run "
                             "without --report-only to run them")
        results["missing_steps"] = missing
    write_report(cfg, results)
    return results


def _versions_of_the_run(out: str) -> dict[str, Any]:
    """The versions of the first invocation, and of this one: a resumed run reports the code that
    ran its steps, and the report names the commit that wrote it if that differs."""
    first = storage.join(out, "steps", "versions.json")
    if not storage.exists(first):
        storage.write_json(first, versions())
    return {"versions": storage.read_json(first), "report_versions": versions()}


# ---- the steps: each returns the JSON its marker keeps --------------------------------------


def _demonstrator(resolved: ExperimentConfig, eval_cfg: EvalConfig) -> dict[str, Any]:
    summary = finetune(resolved.demonstrator)
    return {"finetune": summary, "evaluation": evaluate_agent(EvaluateConfig(agent=resolved.demonstrator.out, eval=eval_cfg))}


def _constant_logits(action: int | None) -> Callable:
    """A policy of logits for ``evaluate_policy``: uniform (None) or always ``action``."""
    def policy(obs):
        if action is None:
            return torch.zeros(len(obs), NUM_ACTIONS)
        logits = torch.full((len(obs), NUM_ACTIONS), -1e9)
        logits[:, action] = 0.0
        return logits

    return policy


def _random_policy(resolved: ExperimentConfig, eval_cfg: EvalConfig) -> dict[str, Any]:
    return {"train_levels": evaluate_policy(_constant_logits(None), resolved.finetune.env, eval_cfg, "random policy")}


def _collect(resolved: ExperimentConfig) -> dict[str, Any]:
    t0 = time.time()
    manifest = collect(resolved.collect, policy_factories=POLICY_FACTORIES)
    seconds = time.time() - t0
    return {"frames": manifest.num_frames, "episodes": manifest.num_episodes,
            "triplets": manifest.num_triplets, "wall_seconds": seconds,
            "frames_per_s": manifest.num_frames / max(seconds, 1e-9), "policy": resolved.collect.policy,
            "mean_episode_return": manifest.made_by.get("mean_episode_return")}


def _pretrain(resolved: ExperimentConfig) -> dict[str, Any]:
    summary = run_pretrain(resolved.pretrain)
    return {k: summary[k] for k in ("probe", "stage1", "stage2", "label") if k in summary}


def _majority(resolved: ExperimentConfig, eval_cfg: EvalConfig) -> dict[str, Any]:
    action = majority_action(resolved.collect.out)
    return {"action": action,
            **evaluate_on_both_level_sets(_constant_logits(action), resolved.finetune.env, eval_cfg, "majority action")}


def _online_runs(cfg: ExperimentConfig, resolved: ExperimentConfig, eval_cfg: EvalConfig, step) -> dict[str, list[dict[str, Any]]]:
    """Every finished online run, by variant, in the order ``cfg.online_runs`` interleaves them."""
    def run(ft) -> dict[str, Any]:
        t0 = time.time()
        summary = finetune(ft)
        seconds = time.time() - t0
        report = evaluate_agent(EvaluateConfig(agent=ft.out, eval=eval_cfg))
        return {"seed": ft.seed, "out": ft.out, "finetune": summary, "evaluation": report,
                "wall_seconds": seconds, "env_steps_per_s": summary["env_steps"] / max(seconds, 1e-9)}

    online: dict[str, list[dict[str, Any]]] = {}
    for variant, seed in cfg.online_runs():
        ft = dataclasses.replace(resolved.finetune, out=storage.join(cfg.out, f"finetune-{variant}-s{seed}"),
                                 scratch=variant == "scratch", seed=seed,
                                 ppo=dataclasses.replace(resolved.finetune.ppo, decoder_sl=variant == "rl+sl"))
        done = step(f"finetune-{variant}-s{seed}", lambda ft=ft: run(ft))
        if done is not None:
            online.setdefault(variant, []).append(done)
    return online


def _offline_runs(cfg: ExperimentConfig, resolved: ExperimentConfig, eval_cfg: EvalConfig, step) -> dict[str, Any]:
    offline: dict[str, Any] = {}
    for k in cfg.decode_k:
        decode_cfg = DecodeConfig(out=storage.join(cfg.out, f"decode-k{k}"), pretrain=resolved.pretrain.out,
                          decoder=dataclasses.replace(cfg.decoder, k=k), env=resolved.finetune.env, eval=eval_cfg,
                          seed=cfg.seed, decoder_hidden=resolved.finetune.decoder_hidden)
        done = step(f"decode-k{k}", lambda decode_cfg=decode_cfg: decode_offline(decode_cfg))
        if done is not None:
            offline[str(k)] = done
    return offline


def majority_action(corpus: str) -> int:
    """The corpus's most frequent action: the agent that always plays it is the floor offline
    decoding must beat (a decoder that learned nothing from the latents converges to it)."""
    return int(np.bincount(read_actions(corpus)).argmax())


# ---- report ------------------------------------------------------------------------------


def write_report(cfg: ExperimentConfig, results: dict[str, Any]) -> None:
    out = cfg.out
    demo_raw = results["demonstrator"]["evaluation"]["train_levels"]["return_mean"]
    rand_raw = results["random"]["train_levels"]["return_mean"]
    norm = lambda raw: demo_norm(raw, rand_raw, demo_raw)  # noqa: E731

    curves = {}
    for variant, runs in results["finetune"].items():
        curves[variant] = []
        for run in runs:
            rows = [r for r in read_metrics(run["out"]) if r.get("episode_return") is not None
                    and r["episode_return"] == r["episode_return"]]
            run["auc"] = curve_mean([(r["env_steps"], r["episode_return"]) for r in rows])
            curves[variant].append([{**r, "return_vs_demo": norm(r["episode_return"])} for r in rows])
    plots = {}
    plot_seed_curves(curves, storage.join(out, "plots", "online.png"), key="return_vs_demo",
                     title=f"{cfg.game}: training return, random policy = 0, demonstrator = 1 (mean, 95% band)")
    plots["online"] = "plots/online.png"
    ks = sorted(int(k) for k in results["decode"])
    if ks:
        plot_offline_decoding(ks, [norm(results["decode"][str(k)]["train_levels"]["return_mean"]) for k in ks],
                              [results["decode"][str(k)]["decoder_val_accuracy"] for k in ks],
                              storage.join(out, "plots", "offline.png"), cfg.game)
        plots["offline"] = "plots/offline.png"
    pre_plots = storage.join(out, "pretrain", "plots")
    for name in ("latent_map.png", "training_curves.png"):
        src = storage.join(pre_plots, name)
        if storage.exists(src):
            storage.write_bytes(storage.join(out, "plots", name), storage.read_bytes(src))
            plots[name] = f"plots/{name}"

    s1_rows = read_metrics(storage.join(out, "pretrain"), "stage1")
    results["stage1_final"] = {k: v for k, v in (s1_rows[-1] if s1_rows else {}).items()
                               if k.startswith(("train/vq", "val/", "train/wm")) or k == "step"}
    storage.write_bytes(storage.join(out, "report.md"), render_experiment_report(cfg, results, norm, plots).encode())
    storage.write_json(storage.join(out, "results.json"), results)
