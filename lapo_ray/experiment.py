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
from typing import Any

import numpy as np

from lapo_ray import storage
from lapo_ray.config.experiment import ExperimentConfig
from lapo_ray.config.rl import DecodeConfig, EvaluateConfig

STEPS = ("demonstrator", "random", "collect", "pretrain", "finetune", "decode", "report")


def _marker(out: str, name: str) -> str:
    return storage.join(out, "steps", f"{name}.json")


def _step(out: str, name: str, fn) -> dict[str, Any]:
    marker = _marker(out, name)
    if storage.exists(marker):
        print(f"experiment: step {name} already done", flush=True)
        return storage.read_json(marker)
    print(f"experiment: step {name} ...", flush=True)
    t0 = time.time()
    result = fn()
    result = {**result, "wall_seconds": result.get("wall_seconds", time.time() - t0)}
    storage.write_json(marker, result)
    return result


def versions() -> dict[str, str]:
    import ray
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "lapo_ray_commit": commit or "unknown", "machine": platform.machine(),
            "cpus": str(os.cpu_count())}


def run_experiment(cfg: ExperimentConfig, preset: str = "cpu") -> dict[str, Any]:
    from lapo_ray.data.collect import collect
    from lapo_ray.envs import NUM_ACTIONS
    from lapo_ray.evaluation.rollout import evaluate_policy
    from lapo_ray.rl.algo import finetune
    from lapo_ray.rl.decode import decode_offline
    from lapo_ray.rl.evaluate import POLICY_FACTORIES, evaluate_agent
    from lapo_ray.train.pretrain import run_pretrain

    c = cfg.resolved()
    out = cfg.out
    storage.makedirs(out)
    storage.write_json(storage.join(out, "config.json"), cfg.to_dict())
    ev = dataclasses.replace(cfg.eval, seed=cfg.seed + 12345)
    # The versions of the first invocation are kept: a resumed run reports the code that ran
    # its steps, and the report names the commit that wrote it if that differs.
    first = storage.join(out, "steps", "versions.json")
    if not storage.exists(first):
        storage.write_json(first, versions())
    results: dict[str, Any] = {"versions": storage.read_json(first), "report_versions": versions(),
                               "preset": preset}

    def demonstrator() -> dict[str, Any]:
        summary = finetune(c.demonstrator)
        report = evaluate_agent(EvaluateConfig(agent=c.demonstrator.out, eval=ev))
        return {"finetune": summary, "evaluation": report}

    results["demonstrator"] = _step(out, "demonstrator", demonstrator)

    def random_policy() -> dict[str, Any]:
        import torch

        def uniform(obs):
            return torch.zeros(len(obs), NUM_ACTIONS)

        env = c.finetune.env
        return {"train_levels": evaluate_policy(uniform, env, ev, "random policy")}

    results["random"] = _step(out, "random", random_policy)

    def collect_step() -> dict[str, Any]:
        t0 = time.time()
        manifest = collect(c.collect, policy_factories=POLICY_FACTORIES)
        seconds = time.time() - t0
        return {"frames": manifest.num_frames, "episodes": manifest.num_episodes,
                "triplets": manifest.num_triplets, "wall_seconds": seconds,
                "frames_per_s": manifest.num_frames / max(seconds, 1e-9), "policy": c.collect.policy}

    results["collect"] = _step(out, "collect", collect_step)

    def pretrain_step() -> dict[str, Any]:
        summary = run_pretrain(c.pretrain)
        return {k: summary[k] for k in ("probe", "stage1", "stage2", "label") if k in summary}

    results["pretrain"] = _step(out, "pretrain", pretrain_step)

    online: dict[str, Any] = {}
    for variant in cfg.variant_list():
        ft = dataclasses.replace(c.finetune, out=storage.join(out, f"finetune-{variant}"),
                                 scratch=variant == "scratch",
                                 ppo=dataclasses.replace(c.finetune.ppo, decoder_sl=variant == "rl+sl"))

        def run_variant(ft=ft) -> dict[str, Any]:
            t0 = time.time()
            summary = finetune(ft)
            seconds = time.time() - t0
            report = evaluate_agent(EvaluateConfig(agent=ft.out, eval=ev))
            return {"finetune": summary, "evaluation": report, "wall_seconds": seconds,
                    "env_steps_per_s": summary["env_steps"] / max(seconds, 1e-9)}

        online[variant] = _step(out, f"finetune-{variant}", run_variant)
    results["finetune"] = online

    offline: dict[str, Any] = {}
    for k in cfg.decode_k:
        dc = DecodeConfig(out=storage.join(out, f"decode-k{k}"), pretrain=c.pretrain.out,
                          decoder=dataclasses.replace(cfg.decoder, k=k), env=c.finetune.env, eval=ev,
                          seed=cfg.seed, decoder_hidden=c.finetune.decoder_hidden)
        offline[str(k)] = _step(out, f"decode-k{k}", lambda dc=dc: decode_offline(dc))
    results["decode"] = offline

    write_report(cfg, results)
    return results


# ---- report ------------------------------------------------------------------------------


def _demo_norm(raw: float, random_raw: float, demo_raw: float) -> float:
    """Normalised so that the random policy scores 0 and the demonstrator 1."""
    span = demo_raw - random_raw
    return float("nan") if abs(span) < 1e-9 else (raw - random_raw) / span


def write_report(cfg: ExperimentConfig, results: dict[str, Any]) -> None:
    from lapo_ray.evaluation.plots import plot_offline_decoding, plot_return_curves
    from lapo_ray.train.metrics import read_metrics

    out = cfg.out
    demo_raw = results["demonstrator"]["evaluation"]["train_levels"]["return_mean"]
    rand_raw = results["random"]["train_levels"]["return_mean"]
    norm = lambda raw: _demo_norm(raw, rand_raw, demo_raw)  # noqa: E731

    curves = {}
    for variant in results["finetune"]:
        rows = read_metrics(storage.join(out, f"finetune-{variant}"))
        curves[variant] = [{**r, "return_vs_demo": norm(r["episode_return"])} for r in rows
                           if r.get("episode_return") is not None]
    plots = {}
    plot_return_curves(curves, storage.join(out, "plots", "online.png"), key="return_vs_demo",
                       title=f"{cfg.game}: return, random policy = 0, demonstrator = 1")
    plots["online"] = "plots/online.png"
    ks = sorted(int(k) for k in results["decode"])
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
    storage.write_bytes(storage.join(out, "report.md"), render_report(cfg, results, norm, plots).encode())
    storage.write_json(storage.join(out, "results.json"), results)


def _f(x: Any, fmt: str = ".3f") -> str:
    """A figure for the report; None and NaN (undefined, e.g. a gap with no room) print as n/a."""
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return format(x, fmt)


def render_report(cfg: ExperimentConfig, results: dict[str, Any], norm, plots: dict[str, str]) -> str:
    v = results["versions"]
    demo, rand = results["demonstrator"], results["random"]
    demo_eval = demo["evaluation"]["train_levels"]
    written = results.get("report_versions", v)["lapo_ray_commit"]
    total_min = sum(_walls(results)) / 60
    c = cfg.resolved()
    s1 = results["pretrain"].get("stage1", {})
    lines = [
        f"# LAPO on {cfg.game}: latent actions from video, then an agent",
        "",
        f"Produced by `python jobs/experiment.py --preset {results.get('preset', 'cpu')}`. "
        f"lapo_ray commit `{v['lapo_ray_commit'][:12]}`"
        + (f" (report written at `{written[:12]}`)" if written != v["lapo_ray_commit"] else "")
        + f"; Python {v['python']}, Ray {v['ray']}, PyTorch {v['torch']}, numpy {v['numpy']}; "
        f"{v['cpus']} CPUs, no GPU.",
        "",
        f"**Seeds.** Experiment seed {cfg.seed}: PPO (every variant and the demonstrator), collection, "
        f"pretraining shuffles and offline decoding. Evaluation environments are seeded {cfg.seed + 12345}; "
        f"training levels are Procgen's unbounded {c.finetune.env.distribution_mode} set from level "
        f"{c.finetune.env.start_level}, held-out levels start at {cfg.eval.held_out_start_level:,}.",
        "",
        f"**Budget.** Demonstrator: {c.demonstrator.ppo.env_steps:,} PPO steps. Corpus: "
        f"{c.collect.frames:,} frames. Stage 1: at most {c.pretrain.stage1.steps:,} steps or "
        f"{c.pretrain.stage1.time_budget_min:g} min (ran {s1.get('steps', 0):,} steps, batch "
        f"{c.pretrain.stage1.batch_size}); stage 2: {c.pretrain.stage2.steps:,} steps. Online: "
        f"{c.finetune.ppo.env_steps:,} env steps per variant on {c.finetune.num_env_runners} env runners x "
        f"{c.finetune.envs_per_runner} envs. Offline: k = {', '.join(str(k) for k in cfg.decode_k)}. "
        f"Evaluation: {cfg.eval.episodes} episodes per level set. Total wall time: **{total_min:.0f} min**.",
        "",
        "Returns are normalised so that the uniform random policy scores 0 and the demonstrator 1, "
        "both measured here with the same evaluation (mean over "
        f"{demo_eval['episodes']} episodes, sampled actions). The official Procgen normalisation "
        "(random 0, the paper's 50M-step PPO expert 1) is given beside it.",
        "",
        "## Demonstrator",
        "",
        f"PPO from scratch for {demo['finetune']['env_steps']:,} environment steps "
        f"({demo['wall_seconds'] / 60:.1f} min). This is a weak demonstrator, not an expert: the paper's "
        "experts trained for 50M steps. Its evaluation on its training levels: raw return "
        f"{demo_eval['return_mean']:.2f} (official normalisation {demo_eval['return_norm_mean']:.2f}); "
        f"random policy: {rand['train_levels']['return_mean']:.2f} "
        f"({rand['train_levels']['return_norm_mean']:.2f}).",
        "",
        "## Corpus and latent actions",
        "",
    ]
    col, pre = results["collect"], results["pretrain"]
    lines += [
        f"{col['frames']:,} frames ({col['episodes']} episodes) collected from the demonstrator on "
        f"{cfg.collect.num_workers} actors at {col['frames_per_s']:,.0f} frames/s. Its actions are stored in a "
        "column that only evaluation reads.",
        "",
    ]
    probe = pre.get("probe") or {}
    if probe:
        from lapo_ray.train.pretrain import probe_lines

        lines += probe_lines(probe, heading=False) + [""]
    if "latent_map.png" in plots:
        lines += [f"![latent actions]({plots['latent_map.png']})", ""]
    lines += ["## Online decoding: PPO from the latent policy vs. from scratch", "",
              f"![online]({plots['online']})", "",
              "| variant | env steps | wall time | env steps/s | final return (raw) | vs demonstrator | "
              "official norm. | held-out levels vs demonstrator | final decoder acc. |",
              "|---|---|---|---|---|---|---|---|---|"]
    finals = {}
    for variant, r in results["finetune"].items():
        tr, ho = r["evaluation"]["train_levels"], r["evaluation"]["held_out_levels"]
        finals[variant] = norm(tr["return_mean"])
        acc = r["finetune"].get("decoder_accuracy")
        lines.append(
            f"| {variant} | {r['finetune']['env_steps']:,} | {r['wall_seconds'] / 60:.1f} min | "
            f"{r['env_steps_per_s']:.0f} | {tr['return_mean']:.2f} ± {_sem(tr):.2f} | "
            f"{finals[variant]:.2f} | {tr['return_norm_mean']:.2f} | {norm(ho['return_mean']):.2f} | "
            f"{'' if acc is None or acc != acc else f'{acc:.2f}'} |")
    lines += ["", verdict(finals, results), ""]
    comparison = _latent_vs_scratch(results)
    if comparison is None or comparison[2] != BEATS:
        lines += ["### Why not", ""] + diagnosis(results) + [""]
    lines += ["## Offline decoding from k labelled frames", "", f"![offline]({plots['offline']})", "",
              "| k | decoder accuracy (held-out triplets) | agent accuracy (policy on o[t]) | return vs demonstrator |",
              "|---|---|---|---|"]
    for k in sorted(results["decode"], key=int):
        r = results["decode"][k]
        lines.append(f"| {k} | {r['decoder_val_accuracy']:.3f} | {r['agent_val_accuracy']:.3f} | "
                     f"{norm(r['train_levels']['return_mean']):.2f} |")
    lines += ["", "## Wall-clock time and throughput", "", "| step | wall time | throughput |", "|---|---|---|"]
    lines.append(f"| demonstrator (PPO) | {demo['wall_seconds'] / 60:.1f} min | "
                 f"{demo['finetune'].get('env_steps_per_s', float('nan')):.0f} env steps/s (last iteration) |")
    lines.append(f"| collection | {col['wall_seconds'] / 60:.1f} min | {col['frames_per_s']:,.0f} frames/s |")
    lines.append(f"| pretraining (stage 1, probe, labelling, stage 2) | {pre['wall_seconds'] / 60:.1f} min | "
                 f"stage 1: {pre.get('stage1', {}).get('steps', 0)} steps |")
    for variant, r in results["finetune"].items():
        lines.append(f"| online {variant} | {r['wall_seconds'] / 60:.1f} min | {r['env_steps_per_s']:.0f} env steps/s |")
    for k in sorted(results["decode"], key=int):
        lines.append(f"| offline decoding k={k} | {results['decode'][k]['wall_seconds'] / 60:.1f} min | |")
    return "\n".join(lines) + "\n"


def diagnosis(results: dict[str, Any]) -> list[str]:
    """The measured suspects when the latent start does not win: the demonstrator's quality,
    whether the latent actions carry the action, the codebook, and the decoders."""
    demo = results["demonstrator"]["evaluation"]["train_levels"]
    rand = results["random"]["train_levels"]
    margin = demo["return_mean"] - rand["return_mean"]
    z = margin / max(float(np.hypot(_sem(demo), _sem(rand))), 1e-9)
    out = [f"- **Demonstrator.** {demo['return_mean']:.2f} against the random policy's {rand['return_mean']:.2f} "
           f"(difference {margin:+.2f}, {z:.1f} standard errors)."
           + (f" It is barely better than random, so the corpus holds little purposeful play to imitate, and on "
              f"the random = 0 / demonstrator = 1 scale one standard error of a {demo['episodes']}-episode mean "
              f"is about {_sem(demo) / max(abs(margin), 1e-9):.2f}." if z < 4 else "")]
    probe = results["pretrain"].get("probe") or {}
    gap = probe.get("gap_closed")
    gap = float("nan") if gap is None else gap  # None: the ceiling did not rise above the floor
    no_action_info = bool(probe) and gap < 0.1  # False for a NaN gap
    if probe:
        text = (f"- **Latent actions.** The probe reaches {_f(probe.get('probe_acc'))} against a floor of "
                f"{_f(probe.get('floor_untrained_idm'))} and a majority rate of {_f(probe.get('majority_rate'))}, "
                f"closing {_f(gap, '.2f')} of the gap to the supervised ceiling of "
                f"{_f(probe.get('ceiling_supervised_idm'))}.")
        if no_action_info:
            text += (f" The actions are visible in the frames (the same probe on an IDM trained on the true actions reaches "
                     f"{_f(probe.get('ceiling_supervised_idm'))}), but in {probe.get('stage1_steps', '?')} steps of stage 1 "
                     "the unsupervised IDM did not learn them: its latent tells the probe nothing beyond the majority "
                     "action, so the latent policy has none of the demonstrator's behaviour to pass on.")
        out.append(text)
    s1 = results.get("stage1_final") or {}
    usage = [v for k, v in sorted(s1.items()) if k.startswith("train/vq_usage")]
    perp = [v for k, v in sorted(s1.items()) if k.startswith("train/vq_perplexity")]
    if usage:
        nmi = ""
        if "nmi_trained" in probe:
            nmi = (f" On the probe's triplets the codes' normalised mutual information with the true action is "
                   f"{_f(probe.get('nmi_trained'))} (untrained IDM {_f(probe.get('nmi_untrained'))}).")
        out.append(f"- **Codebook.** At the end of stage 1 the codebooks use {', '.join(f'{u:.0%}' for u in usage)} "
                   f"of their codes (perplexity {', '.join(f'{p:.1f}' for p in perp)}); world-model validation loss "
                   f"{_f(s1.get('val/wm_loss'), '.4g')}." + nmi
                   + (" Codes in use are no evidence of action information: with dead-code splitting, pure-noise "
                      "latents also use nearly every code." if min(usage) > 0.5 and no_action_info else ""))
    decoders = []
    dec = results.get("decode") or {}
    if dec:
        k = max(dec, key=int)
        decoders.append(f"Offline, a decoder trained on k = {int(k):,} labelled frames predicts held-out true actions "
                        f"with accuracy {dec[k]['decoder_val_accuracy']:.3f} (majority rate "
                        f"{_f(probe.get('majority_rate'))}).")
    acc = (results["finetune"].get("rl+sl") or {}).get("finetune", {}).get("decoder_accuracy")
    if acc is not None and acc == acc:
        decoders.append(f"Online, the RL + SL decoder ends at {acc:.2f} accuracy on the actions the agent itself "
                        "took (its own policy's actions, so this measures agreement, not knowledge of the game).")
    if decoders:
        out.append("- **Decoders.** " + " ".join(decoders))
    return out


def _sem(evaluation: dict[str, Any]) -> float:
    """Standard error of an evaluation's mean return."""
    return evaluation["return_std"] / np.sqrt(max(evaluation["episodes"], 1))


def _walls(results: dict[str, Any]) -> list[float]:
    steps = [results.get(k, {}) for k in ("demonstrator", "random", "collect", "pretrain")]
    steps += list(results.get("finetune", {}).values()) + list(results.get("decode", {}).values())
    return [float(s.get("wall_seconds", 0.0)) for s in steps]


BEATS = "**beats**"


def _latent_vs_scratch(results: dict[str, Any]) -> tuple[float, float, str] | None:
    """(raw difference, its standard error, verdict word) of RL + SL against scratch on the
    training levels; the latent start wins only beyond two standard errors."""
    online = results["finetune"]
    if "rl+sl" not in online or "scratch" not in online:
        return None
    tr_a = online["rl+sl"]["evaluation"]["train_levels"]
    tr_b = online["scratch"]["evaluation"]["train_levels"]
    sem = float(np.hypot(_sem(tr_a), _sem(tr_b)))
    diff = tr_a["return_mean"] - tr_b["return_mean"]
    if diff > 2 * sem:
        return diff, sem, BEATS
    if diff < -2 * sem:
        return diff, sem, "**does worse than**"
    return diff, sem, "**is not distinguishable from**"


def verdict(finals: dict[str, float], results: dict[str, Any]) -> str:
    if "scratch" not in finals or "rl+sl" not in finals:
        return "The comparison needs both the rl+sl and the scratch variants."
    a, b = finals["rl+sl"], finals["scratch"]
    steps = results["finetune"]["scratch"]["finetune"]["env_steps"]
    diff, sem, word = _latent_vs_scratch(results)
    return (f"At {steps:,} environment steps, PPO from the latent policy (RL + SL) {word} PPO from scratch: "
            f"{a:.2f} vs {b:.2f} of the demonstrator's return (raw difference {diff:+.2f}, two standard "
            f"errors {2 * sem:.2f}).")
