"""report.md of ``jobs/pretrain.py``, and the probe's table that the experiment's report shares.

They turn dicts of figures into text and read nothing else, so they sit below the rooms that run
things. The experiment's report is ``experiment_report.py``.
"""

from __future__ import annotations

import math
from typing import Any

from lapo_ray.evaluation.claims import resolved_gap_closed


def demo_norm(raw: float, random_raw: float, demo_raw: float) -> float:
    """Normalised so that the random policy scores 0 and the demonstrator 1."""
    span = demo_raw - random_raw
    return float("nan") if abs(span) < 1e-9 else (raw - random_raw) / span


def render_pretrain_report(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """report.md of a pretraining run: the source, the probe and the last metrics of each stage."""
    lines = ["# lapo_ray pretraining report", "", f"Source: `{summary['source']['name']}` "
             f"({summary['source']['frames']:,} frames, {summary['source']['episodes']:,} episodes, "
             f"{summary['source']['triplets']:,} triplets).", ""]
    if summary.get("sources"):
        lines += source_lines(summary["sources"]) + [""]
    if "probe" in summary:
        lines += probe_lines(summary["probe"]) + ["", "![latent map](plots/latent_map.png)", ""]
        if summary["probe"].get("per_source"):
            lines += per_source_probe_lines(summary["probe"]["per_source"]) + [""]
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


def source_lines(sources: list[dict[str, Any]]) -> list[str]:
    """The sources of a corpus of several (``data.mixture``): their weights and triplets per split."""
    lines = ["## Sources", "", "| source | weight | episodes (validation) | train triplets | validation triplets |",
             "|---|---|---|---|---|"]
    for r in sources:
        weight = "by size" if r.get("weight") is None else f"{r['weight']:.3g}"
        lines.append(f"| `{r['source']}` | {weight} | {r['episodes']:,} ({r['val_episodes']:,}) | "
                     f"{r['train_triplets']:,} | {r['val_triplets']:,} |")
    lines += ["", "Each source is split by episode on its own; the training stream holds the sources in their "
              "weights' proportions (by size when none are given); no triplet mixes sources."]
    return lines


def per_source_probe_lines(per_source: dict[str, dict[str, Any]]) -> list[str]:
    """The probe on each source's own validation episodes."""
    lines = ["## Probe per source (each source's held-out episodes)", "",
             "| source | trained IDM | floor: untrained IDM | majority action | ceiling: supervised IDM | "
             "gap closed | test triplets |", "|---|---|---|---|---|---|---|"]
    for name, p in per_source.items():
        if "skipped" in p:
            lines.append(f"| `{name}` | skipped: {p['skipped']} | | | | | |")
            continue
        closed, _ = resolved_gap_closed(p) if "gap_closed" in p else (None, None)
        lines.append(f"| `{name}` | {fmt(p.get('probe_acc'))} | {fmt(p.get('floor_untrained_idm'))} | "
                     f"{fmt(p.get('majority_rate'))} | {fmt(p.get('ceiling_supervised_idm'))} | {fmt(closed, '.2f')} | "
                     f"{p.get('n_test', '?')} |")
    return lines


def fmt(v: Any, spec: str = ".3f") -> str:
    """A figure for a report; None and NaN (undefined, e.g. a gap with no room) print as n/a."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
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
    if any(f"info_bits_{n}" in p for n in ("trained", "untrained", "supervised")):
        lines.append(f"| information about the action (bits: the probe's test cross-entropy below that of the "
                     f"action frequencies), trained / floor / ceiling | {fmt(p.get('info_bits_trained'))} / "
                     f"{fmt(p.get('info_bits_untrained'))} / {fmt(p.get('info_bits_supervised'))} |")
    if "gap_closed" in p:
        closed, two_se = resolved_gap_closed(p)
        if closed is None:
            gap = (p.get("ceiling_supervised_idm") or 0.0) - (p.get("floor_untrained_idm") or 0.0)
            text = ("undefined: the ceiling is not above the floor" if gap <= 0 else
                    f"undefined: the ceiling is above the floor by {gap:.4f}, within two standard errors "
                    f"({two_se:.4f}) of the probe's test accuracy, so there is no measurable gap to close")
        else:
            text = f"{closed:.2f}"
        lines += ["", f"**Share of the floor-to-ceiling gap closed: {text}**"]
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
