"""report.md of ``jobs/experiment.py``: one function per section, from the results the
experiment gathered and the claims judged on them (``claims.judge``).

Figures are formatted by the few helpers at the top, so a number reads the same wherever it
appears. The text names only what the figures and the game's action set show.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from lapo_ray.config.experiment import ExperimentConfig
from lapo_ray.envs import ACTION_NAMES
from lapo_ray.evaluation.claims import (
    DEMONSTRATOR_TARGET_NORM,
    DEMONSTRATOR_TARGET_SE,
    MEASURE_TEXT,
    OFFLINE_K,
    PROBE_TARGET_GAP,
    Claims,
    Comparison,
    Measure,
    Outcome,
    judge,
    resolved_gap_closed,
    standard_errors_apart,
    train_levels,
)
from lapo_ray.evaluation.reports import fmt, probe_lines
from lapo_ray.evaluation.stats import mean_interval, sem

Norm = Callable[[float], float]

# ---- formatting ---------------------------------------------------------------------------


def pm(mean: float, half: float, spec: str = ".2f") -> str:
    """``mean ± half``, or the mean alone where the half-width is undefined (one seed)."""
    return format(mean, spec) + ("" if math.isnan(half) else f" ± {format(half, spec)}")


def ev_pm(evaluation: dict[str, Any]) -> str:
    """An evaluation's mean return ± its standard error."""
    return f"{evaluation['return_mean']:.2f} ± {sem(evaluation):.2f}"


def interval(c: Comparison) -> str:
    return f"[{c.difference.low:+.2f}, {c.difference.high:+.2f}]"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def action_name(action: int) -> str:
    return f"{action} ({ACTION_NAMES[action]})"


_RELATION = {Outcome.AHEAD: "is ahead of", Outcome.BEHIND: "is behind", Outcome.LEVEL: "cannot be told apart from"}


def relation(c: Comparison, bold: bool = True) -> str:
    return f"**{_RELATION[c.outcome]}**" if bold else _RELATION[c.outcome]


def _mean_valid(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


# ---- sections -----------------------------------------------------------------------------


def render_experiment_report(cfg: ExperimentConfig, results: dict[str, Any], norm: Norm,
                             plots: dict[str, str]) -> str:
    """The whole report. ``norm`` maps a raw return onto random = 0, demonstrator = 1; ``plots``
    names the figures written beside it (``online``, ``offline``, ``latent_map.png``)."""
    claims = judge(results)
    sections = [
        _header(cfg, results),
        _partial(results),
        _method(),
        _demonstrator(results, claims),
        _corpus(cfg, results, plots),
        _online(cfg, results, claims, norm, plots),
        _offline(results, claims, norm, plots),
        _diagnosis_section(cfg, results, claims),
        _timings(results),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


def _header(cfg: ExperimentConfig, results: dict[str, Any]) -> list[str]:
    versions = results["versions"]
    written = results.get("report_versions", versions)["lapo_ray_commit"]
    rewritten = f" (report written at `{written[:12]}`)" if written != versions["lapo_ray_commit"] else ""
    resolved = cfg.resolved()
    online = results["finetune"]
    seeds = sorted({r["seed"] for runs in online.values() for r in runs})
    stage1 = results["pretrain"].get("stage1", {})
    total = sum(_walls(results))
    return [
        f"# LAPO on {cfg.game}: latent actions from video, then an agent", "",
        f"Produced by `python jobs/experiment.py --preset {results.get('preset', 'cpu')}`. "
        f"lapo_ray commit `{versions['lapo_ray_commit'][:12]}`{rewritten}; Python {versions['python']}, "
        f"Ray {versions['ray']}, PyTorch {versions['torch']}, numpy {versions['numpy']}; {versions['cpus']} CPUs, "
        "no GPU.", "",
        f"**Seeds.** Experiment seed {cfg.seed}: the demonstrator, collection, pretraining shuffles and offline "
        f"decoding. Online PPO seeds: {', '.join(str(s) for s in seeds)} for "
        + ", ".join(f"{name} ({len(runs)})" for name, runs in online.items())
        + f". Evaluation environments are seeded {cfg.seed + 12345}; training levels are Procgen's unbounded "
        f"{resolved.finetune.env.distribution_mode} set from level {resolved.finetune.env.start_level}, "
        f"held-out levels start at {cfg.eval.held_out_start_level:,}.", "",
        f"**Budget.** Demonstrator: {resolved.demonstrator.ppo.env_steps:,} PPO steps. Corpus: "
        f"{resolved.collect.frames:,} frames. Stage 1: at most {resolved.pretrain.stage1.steps:,} steps or "
        f"{resolved.pretrain.stage1.time_budget_min:g} min (ran {stage1.get('steps', 0):,} steps, batch "
        f"{resolved.pretrain.stage1.batch_size}); stage 2: {resolved.pretrain.stage2.steps:,} steps. Online: "
        f"{resolved.finetune.ppo.env_steps:,} env steps per run on {resolved.finetune.num_env_runners} env runners "
        f"x {resolved.finetune.envs_per_runner} envs. Offline: k = "
        f"{', '.join(str(k) for k in cfg.decode_k)}. Evaluation: {cfg.eval.episodes} episodes per agent and level "
        f"set. Total wall time: **{total / 60:.0f} min**.", "",
    ]


def _partial(results: dict[str, Any]) -> list[str]:
    if not results.get("missing_steps"):
        return []
    return [f"**Partial report.** Steps not run yet: {', '.join(results['missing_steps'])}. Running "
            "`python jobs/experiment.py` again with the same flags continues from here.", ""]


def _method() -> list[str]:
    return [
        f"**The comparison, chosen before the run:** {MEASURE_TEXT[Measure.AUC]}. RL + SL is ahead of scratch "
        "only if the 95% interval of the difference (Welch's t on the per-seed values) lies above zero.", "",
        "Returns are normalised so that the uniform random policy scores 0 and the demonstrator 1, both measured "
        "here with the same evaluation (sampled actions). The official normalisation (random 0, the LAPO paper's "
        "PPO expert 1) is given beside it.", "",
    ]


def _demonstrator(results: dict[str, Any], claims: Claims) -> list[str]:
    demo = results["demonstrator"]
    de, re = train_levels(demo), train_levels(results["random"])
    return [
        "## Demonstrator", "",
        f"PPO from scratch for {demo['finetune']['env_steps']:,} environment steps ({minutes(demo['wall_seconds'])}). "
        f"On its training levels: raw return {ev_pm(de)} (official normalisation {de['return_norm_mean']:.2f}); "
        f"random policy {ev_pm(re)} ({re['return_norm_mean']:.2f}): {claims.demonstrator.value:.1f} standard "
        f"errors above random. Target: at least {DEMONSTRATOR_TARGET_SE:g} standard errors and "
        f"{DEMONSTRATOR_TARGET_NORM} official: **{claims.demonstrator.outcome.value}**.", "",
    ]


def _noise_text(cfg: ExperimentConfig, col: dict[str, Any]) -> str:
    if cfg.collect.epsilon <= 0:
        return ""
    eps, hold = cfg.collect.epsilon, cfg.collect.noise_hold
    how = (f"is held for 1 / (1 - {hold:g}) = {1 / (1 - hold):.0f} steps on average instead of the demonstrator's"
           if hold > 0 else "replaces the demonstrator's")
    text = (f", with behaviour noise: with probability {eps:g} per step a uniform random action {how}, "
            f"{cfg.collect.noise_share:.0%} of the steps in all")
    if col.get("mean_episode_return") is not None:
        text += f" (the collection's mean episode return: {col['mean_episode_return']:.2f})"
    return text


def _corpus(cfg: ExperimentConfig, results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    col = results["collect"]
    lines = ["## Corpus and latent actions", "",
             f"{col['frames']:,} frames ({col['episodes']} episodes) collected from the demonstrator on "
             f"{cfg.collect.num_workers} actors at {col['frames_per_s']:,.0f} frames/s{_noise_text(cfg, col)}. "
             "Its actions are stored in a column that only evaluation reads.", ""]
    probe = results["pretrain"].get("probe") or {}
    if probe:
        lines += probe_lines(probe, heading=False) + [""]
    if "latent_map.png" in plots:
        lines += [f"![latent actions]({plots['latent_map.png']})", ""]
    return lines


def _online_row(variant: str, runs: list[dict[str, Any]], norm: Norm) -> str:
    raw = [train_levels(r)["return_mean"] for r in runs]
    held = float(np.mean([r["evaluation"]["held_out_levels"]["return_mean"] for r in runs]))
    official = float(np.mean([train_levels(r)["return_norm_mean"] for r in runs]))
    m, half = mean_interval(raw)
    acc = _mean_valid([r["finetune"].get("decoder_accuracy") for r in runs])
    cells = [variant, str(len(runs)), f"{runs[0]['finetune']['env_steps']:,}",
             minutes(float(np.mean([r["wall_seconds"] for r in runs]))),
             f"{np.mean([r['env_steps_per_s'] for r in runs]):.0f}", pm(*mean_interval([r["auc"] for r in runs])),
             pm(m, half), f"{norm(m):.2f}", f"{official:.2f}", f"{norm(held):.2f}",
             "" if acc is None else f"{acc:.2f}"]
    return "| " + " | ".join(cells) + " |"


def _online(cfg: ExperimentConfig, results: dict[str, Any], claims: Claims, norm: Norm,
            plots: dict[str, str]) -> list[str]:
    online = results["finetune"]
    seeds = sorted({r["seed"] for runs in online.values() for r in runs})
    lines = ["## Online decoding: PPO from the latent policy vs. from scratch", "",
             f"![online]({plots['online']})", "",
             "Mean over seeds with the 95% t interval across seeds; each seed's return is the mean of its "
             f"{cfg.eval.episodes}-episode evaluation.", "",
             "| variant | seeds | env steps | wall time per run | env steps/s | area under the curve (raw) | "
             "final return (raw) | vs demonstrator | official norm. | held-out levels vs demonstrator | "
             "final decoder acc. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_online_row(variant, runs, norm) for variant, runs in online.items()]
    lines += ["", "Per seed: area under the curve, and the final evaluation's raw return on the training levels "
              "(mean ± standard error of its episodes):", "",
              "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for variant, runs in online.items():
        by_seed = {r["seed"]: r for r in runs}
        cells = [f"{by_seed[s]['auc']:.2f}; {ev_pm(train_levels(by_seed[s]))}" if s in by_seed else ""
                 for s in seeds]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines + ["", online_verdict(results, claims), ""]


def online_verdict(results: dict[str, Any], claims: Claims) -> str:
    claim = claims.online
    if claim is None:
        return "The comparison needs both the rl+sl and the scratch variants."
    steps = results["finetune"]["scratch"][0]["finetune"]["env_steps"]
    text = (f"**Verdict.** Over {steps:,} environment steps, PPO from the latent policy (RL + SL) {relation(claim)} "
            f"PPO from scratch: area under the learning curve (mean training return) {claim.difference.diff:+.2f} raw, "
            f"95% interval {interval(claim)} ({claim.difference.test}).")
    final = claims.online_final
    if final is not None:
        text += (f" Secondary, the final evaluation: {final.difference.diff:+.2f} raw, 95% interval {interval(final)} "
                 f"({final.difference.test}), RL + SL {relation(final, bold=False)} scratch.")
    return text


def _offline(results: dict[str, Any], claims: Claims, norm: Norm, plots: dict[str, str]) -> list[str]:
    lines = ["## Offline decoding from k labelled frames", ""]
    if "offline" in plots:
        lines += [f"![offline]({plots['offline']})", ""]
    lines += ["| k | decoder accuracy (held-out triplets) | agent accuracy (policy on o[t]) | return (raw) | "
              "return vs demonstrator |", "|---|---|---|---|---|"]
    for k in sorted(results["decode"], key=int):
        r = results["decode"][k]
        lines.append(f"| {k} | {r['decoder_val_accuracy']:.3f} | {r['agent_val_accuracy']:.3f} | "
                     f"{ev_pm(r['train_levels'])} | {norm(r['train_levels']['return_mean']):.2f} |")
    maj = results.get("majority")
    if maj:
        me = train_levels(maj)
        lines += ["", f"Majority-action agent (always action {action_name(maj['action'])}, the corpus's most "
                  f"frequent): {ev_pm(me)} raw, {norm(me['return_mean']):.2f} of the demonstrator."]
    claim = claims.offline
    if claim is not None:
        lines += ["", f"**Offline verdict.** Decoding from k = {OFFLINE_K} labelled frames {relation(claim)} the "
                  f"majority-action agent: difference {claim.difference.diff:+.2f} raw, 95% interval {interval(claim)} "
                  f"({claim.difference.test})."]
    return lines + [""]


def _diagnosis_section(cfg: ExperimentConfig, results: dict[str, Any], claims: Claims) -> list[str]:
    if claims.all_met:
        return []
    return ["## Targets missed, and the measured causes", ""] + diagnosis(results, cfg.game) + [""]


def _timings(results: dict[str, Any]) -> list[str]:
    demo, col, pre = results["demonstrator"], results["collect"], results["pretrain"]
    lines = ["## Wall-clock time and throughput", "", "| step | wall time | throughput |", "|---|---|---|",
             f"| demonstrator (PPO) | {minutes(demo['wall_seconds'])} | "
             f"{demo['finetune'].get('env_steps_per_s', float('nan')):.0f} env steps/s (last iteration) |",
             f"| collection | {minutes(col['wall_seconds'])} | {col['frames_per_s']:,.0f} frames/s |",
             f"| pretraining (stage 1, probe with floor and ceiling, labelling, stage 2) | "
             f"{minutes(pre['wall_seconds'])} | stage 1: {pre.get('stage1', {}).get('steps', 0)} steps |"]
    for variant, runs in results["finetune"].items():
        lines += [f"| online {variant} seed {r['seed']} | {minutes(r['wall_seconds'])} | "
                  f"{r['env_steps_per_s']:.0f} env steps/s |" for r in runs]
    for k in sorted(results["decode"], key=int):
        lines.append(f"| offline decoding k={k} | {minutes(results['decode'][k]['wall_seconds'])} | |")
    evals = sum((results.get(k) or {}).get("wall_seconds", 0.0) for k in ("random", "majority"))
    lines.append(f"| random and majority-action evaluations | {minutes(evals)} | |")
    return lines


def _walls(results: dict[str, Any]) -> list[float]:
    steps = [results.get(k) or {} for k in ("demonstrator", "random", "collect", "majority", "pretrain")]
    steps += [r for runs in results.get("finetune", {}).values() for r in runs]
    steps += list(results.get("decode", {}).values())
    return [float(s.get("wall_seconds", 0.0)) for s in steps]


# ---- diagnosis ----------------------------------------------------------------------------


def diagnosis(results: dict[str, Any], game: str) -> list[str]:
    """Each target the run missed, by how much, and the measured suspects: the demonstrator's
    quality, whether the latent actions carry the action, the codebook, and the decoders."""
    claims = judge(results)
    probe = results["pretrain"].get("probe") or {}
    causes = [_demonstrator_cause(results), _latent_cause(results, probe, game), _codebook_cause(results, probe),
              _online_cause(claims), _decoder_cause(results, claims, probe)]
    return [c for c in causes if c]


def _demonstrator_cause(results: dict[str, Any]) -> str:
    demo, rand = train_levels(results["demonstrator"]), train_levels(results["random"])
    margin = demo["return_mean"] - rand["return_mean"]
    z = standard_errors_apart(demo, rand)
    text = (f"- **Demonstrator.** {demo['return_mean']:.2f} against the random policy's {rand['return_mean']:.2f} "
            f"(difference {margin:+.2f}, {z:.1f} standard errors; official normalisation "
            f"{fmt(demo.get('return_norm_mean'), '.2f')}, target {DEMONSTRATOR_TARGET_NORM}).")
    if z < 4:
        text += (f" It is barely better than random, so the corpus holds little purposeful play to imitate, and on "
                 f"the random = 0 / demonstrator = 1 scale one standard error of a {demo['episodes']}-episode mean "
                 f"is about {sem(demo) / max(abs(margin), 1e-9):.2f}.")
    return text


def _no_action_info(probe: dict[str, Any]) -> bool:
    gap = resolved_gap_closed(probe)[0] if probe else None
    return gap is not None and gap < 0.1


def _latent_cause(results: dict[str, Any], probe: dict[str, Any], game: str) -> str:
    if not probe:
        return ""
    gap, two_se = resolved_gap_closed(probe)
    target = (f"not measurable: the ceiling is within two standard errors, {two_se:.3f}, of the floor" if gap is None
              else "met" if gap >= PROBE_TARGET_GAP else f"missed by {PROBE_TARGET_GAP - gap:.2f}")
    text = (f"- **Latent actions.** The probe reaches {fmt(probe.get('probe_acc'))} against a floor of "
            f"{fmt(probe.get('floor_untrained_idm'))} and a majority rate of {fmt(probe.get('majority_rate'))}, "
            f"closing {fmt(gap, '.2f')} of the gap to the supervised ceiling of "
            f"{fmt(probe.get('ceiling_supervised_idm'))} (target {PROBE_TARGET_GAP:.2f}, {target}).")
    if gap is None and probe.get("ceiling_supervised_idm") is not None:
        majority = results.get("majority")
        most = f" ({ACTION_NAMES[majority['action']]})" if majority else ""
        text += (f" Even an IDM trained on the true actions predicts them no better than the majority rate of "
                 f"{fmt(probe.get('majority_rate'))}: in this {game} corpus one action{most} makes up that share of "
                 "the steps, and the supervised IDM cannot tell the others apart in the frames, so accuracy cannot "
                 "rank latents here. The information the latent carries about the action (bits, in the probe "
                 "table) and the code-action NMI still can.")
    if _no_action_info(probe):
        text += (f" The actions are visible in the frames (the same probe on an IDM trained on the true actions "
                 f"reaches {fmt(probe.get('ceiling_supervised_idm'))}), but in {probe.get('stage1_steps', '?')} steps "
                 "of stage 1 the unsupervised IDM did not learn them: its latent tells the probe nothing beyond the "
                 "majority action, so the latent policy has none of the demonstrator's behaviour to pass on.")
    return text


def _codebook_cause(results: dict[str, Any], probe: dict[str, Any]) -> str:
    s1 = results.get("stage1_final") or {}
    usage = [v for k, v in sorted(s1.items()) if k.startswith("train/vq_usage")]
    perp = [v for k, v in sorted(s1.items()) if k.startswith("train/vq_perplexity")]
    if not usage:
        return ""
    text = (f"- **Codebook.** At the end of stage 1 the codebooks use {', '.join(f'{u:.0%}' for u in usage)} of "
            f"their codes (perplexity {', '.join(f'{p:.1f}' for p in perp)}); world-model validation loss "
            f"{fmt(s1.get('val/wm_loss'), '.4g')}.")
    if "nmi_trained" in probe:
        text += (f" On the probe's triplets the codes' normalised mutual information with the true action is "
                 f"{fmt(probe.get('nmi_trained'))} (untrained IDM {fmt(probe.get('nmi_untrained'))}).")
    if min(usage) > 0.5 and _no_action_info(probe):
        text += (" Codes in use are no evidence of action information: with dead-code splitting, pure-noise "
                 "latents also use nearly every code.")
    return text


def _online_cause(claims: Claims) -> str:
    claim = claims.online
    if claim is None or claim.outcome is Outcome.AHEAD:
        return ""
    return (f"- **Online.** RL + SL minus scratch, area under the curve: {claim.difference.diff:+.2f} raw, "
            f"95% interval {interval(claim)} ({claim.difference.test}).")


def _decoder_cause(results: dict[str, Any], claims: Claims, probe: dict[str, Any]) -> str:
    parts = []
    dec = results.get("decode") or {}
    if dec:
        k = max(dec, key=int)
        parts.append(f"Offline, a decoder trained on k = {int(k):,} labelled frames predicts held-out true actions "
                     f"with accuracy {dec[k]['decoder_val_accuracy']:.3f} (majority rate "
                     f"{fmt(probe.get('majority_rate'))}).")
    claim = claims.offline
    if claim is not None and claim.outcome is not Outcome.AHEAD:
        parts.append(f"At k = {OFFLINE_K} the decoded agent minus the majority-action agent: "
                     f"{claim.difference.diff:+.2f} raw, 95% interval {interval(claim)}.")
    acc = _mean_valid([r["finetune"].get("decoder_accuracy") for r in results["finetune"].get("rl+sl", [])])
    if acc is not None:
        parts.append(f"Online, the RL + SL decoder ends at {acc:.2f} accuracy on the actions the agent itself took "
                     "(its own policy's actions, so this measures agreement, not knowledge of the game).")
    return "- **Decoders.** " + " ".join(parts) if parts else ""
