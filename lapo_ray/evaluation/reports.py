"""The reports, in one place: markdown from the results the pipelines measured.

``render_pretrain_report`` (and its ``probe_lines``) for ``jobs/pretrain.py``'s report.md, and
``render_experiment_report`` with its verdict and diagnosis for ``jobs/experiment.py``. They turn
dicts of figures into text and read nothing else, so they sit below the rooms that run things.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lapo_ray.config.experiment import ExperimentConfig


def demo_norm(raw: float, random_raw: float, demo_raw: float) -> float:
    """Normalised so that the random policy scores 0 and the demonstrator 1."""
    span = demo_raw - random_raw
    return float("nan") if abs(span) < 1e-9 else (raw - random_raw) / span


def render_pretrain_report(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """report.md of a pretraining run: the source, the probe and the last metrics of each stage."""
    lines = ["# lapo_ray pretraining report", "", f"Source: `{summary['source']['name']}` "
             f"({summary['source']['frames']:,} frames, {summary['source']['episodes']:,} episodes, "
             f"{summary['source']['triplets']:,} triplets).", ""]
    if "probe" in summary:
        lines += probe_lines(summary["probe"]) + ["", "![latent map](plots/latent_map.png)", ""]
    last = {}
    for r in rows:
        last[r["stage"]] = r
    for stage in ("stage1", "stage2"):
        if stage in last:
            r = last[stage]
            lines += [f"## {stage}", "", f"step {r['step']}, {r['samples_per_s']:.0f} samples/s "
                      f"({r['world_size']} worker(s)), data wait {100 * r['data_wait_frac']:.0f}%", ""]
            lines += [f"- {k}: {v:.4g}" for k, v in sorted(r.items()) if "/" in k and isinstance(v, float)]
            lines.append("")
    lines += ["![training curves](plots/training_curves.png)", ""]
    return "\n".join(lines)


def fmt(v: Any, spec: str = ".3f") -> str:
    """A figure for a report; None and NaN (undefined, e.g. a gap with no room) print as n/a."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, (list, tuple)):
        return ", ".join(format(x, ".1f") for x in v)
    return format(v, spec)


def probe_lines(p: dict[str, Any], heading: bool = True) -> list[str]:
    """probe.json as markdown: accuracies with their references, then what the codes carry."""
    lines = ["## Latent-action probe (held-out episodes)", ""] if heading else []
    lines += ["| probe on held-out triplets | accuracy |", "|---|---|",
              f"| trained IDM (no labels) | {fmt(p.get('probe_acc'))} |",
              f"| floor: untrained IDM | {fmt(p.get('floor_untrained_idm'))} |",
              f"| majority action | {fmt(p.get('majority_rate'))} |"]
    if "ceiling_supervised_idm" in p:
        lines.append(f"| ceiling: same probe on an IDM trained on the true actions | "
                     f"{fmt(p.get('ceiling_supervised_idm'))} |")
    if "direct_supervised_classifier" in p:
        lines.append(f"| direct supervised classifier (that IDM's own action head; not a probe) | "
                     f"{fmt(p.get('direct_supervised_classifier'))} |")
    if "gap_closed" in p:
        closed = ("undefined (the ceiling is not above the floor)" if p["gap_closed"] is None
                  else f"{p['gap_closed']:.2f}")
        lines += ["", f"**Share of the floor-to-ceiling gap closed: {closed}**"]
    if "nmi_trained" in p:
        lines += ["", "| discrete codes vs true actions (no training) | trained IDM | untrained IDM |",
                  "|---|---|---|",
                  f"| normalised mutual information (chance-corrected, 1 = code determines action) | "
                  f"{fmt(p.get('nmi_trained'))} | {fmt(p.get('nmi_untrained'))} |",
                  f"| codebook perplexity (codes in use; says nothing about the action) | "
                  f"{fmt(p.get('perplexity_trained'))} | {fmt(p.get('perplexity_untrained'))} |"]
    lines += ["", f"Probe: {p.get('n_train', '?')} train / {p.get('n_val', '?')} validation / "
              f"{p.get('n_test', '?')} test triplets (split by episode), best validation epoch "
              f"{p.get('probe_best_epoch', '?')}, after {p.get('stage1_steps', '?')} stage-1 steps."]
    return lines


def render_experiment_report(cfg: ExperimentConfig, results: dict[str, Any], norm, plots: dict[str, str]) -> str:
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
        text = (f"- **Latent actions.** The probe reaches {fmt(probe.get('probe_acc'))} against a floor of "
                f"{fmt(probe.get('floor_untrained_idm'))} and a majority rate of {fmt(probe.get('majority_rate'))}, "
                f"closing {fmt(gap, '.2f')} of the gap to the supervised ceiling of "
                f"{fmt(probe.get('ceiling_supervised_idm'))}.")
        if no_action_info:
            text += (f" The actions are visible in the frames (the same probe on an IDM trained on the true actions reaches "
                     f"{fmt(probe.get('ceiling_supervised_idm'))}), but in {probe.get('stage1_steps', '?')} steps of stage 1 "
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
                   f"{fmt(probe.get('nmi_trained'))} (untrained IDM {fmt(probe.get('nmi_untrained'))}).")
        out.append(f"- **Codebook.** At the end of stage 1 the codebooks use {', '.join(f'{u:.0%}' for u in usage)} "
                   f"of their codes (perplexity {', '.join(f'{p:.1f}' for p in perp)}); world-model validation loss "
                   f"{fmt(s1.get('val/wm_loss'), '.4g')}." + nmi
                   + (" Codes in use are no evidence of action information: with dead-code splitting, pure-noise "
                      "latents also use nearly every code." if min(usage) > 0.5 and no_action_info else ""))
    decoders = []
    dec = results.get("decode") or {}
    if dec:
        k = max(dec, key=int)
        decoders.append(f"Offline, a decoder trained on k = {int(k):,} labelled frames predicts held-out true actions "
                        f"with accuracy {dec[k]['decoder_val_accuracy']:.3f} (majority rate "
                        f"{fmt(probe.get('majority_rate'))}).")
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
