"""report.md of ``jobs/pretrain.py`` and of ``jobs/probe.py``, and the probe's table that the
experiment's report shares.

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
    if summary.get("atlas"):
        lines += atlas_lines(None) + [""]
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
              f"{p.get('probe_best_epoch', '?')}, after {p.get('stage1_steps') or '?'} stage-1 steps."]
    return lines


ATLAS_TEXT = ("Each row is one of the most used latent actions (a code tuple: codebooks apart by `/`), applied by "
              "the trained world model to the same held-out contexts (o[t-1], o[t]) with its codebook vectors as "
              "the latent: the predicted o[t+1], and its change from o[t] (red brighter, blue darker, one scale "
              "for the whole figure). The first row shows each context's o[t] and its true change.")


def atlas_lines(atlas: dict[str, Any] | None) -> list[str]:
    """The atlas's section: what it shows, its rows as a table when given, and the image."""
    lines = ["## Latent-action atlas", "", ATLAS_TEXT, ""]
    if atlas:
        with_actions = any("action" in r for r in atlas["rows"])
        lines += ["| row | code tuple | share of held-out triplets | " + (
            "most frequent true action (its share of the row) |" if with_actions else ""),
            "|---|---|---|" + ("---|" if with_actions else "")]
        for i, r in enumerate(atlas["rows"], 1):
            cells = [str(i), f"`{r['label']}`", f"{100 * r['share']:.1f}%"]
            if with_actions:
                cells.append(f"{r['action_name']} ({100 * r['action_share']:.0f}%)" if "action" in r else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"{atlas['distinct']:,} distinct code tuples on {atlas['triplets']:,} held-out triplets.", ""]
    return lines + ["![latent-action atlas](plots/atlas.png)"]


def render_probe_report(p: dict[str, Any]) -> str:
    """report.md of ``jobs/probe.py`` from its probe.json."""
    src = p["source"]
    steps = "an export" if p.get("stage1_steps") is None else f"{p['stage1_steps']:,} stage-1 steps"
    lines = [f"# Latent-action probe of `{p['checkpoint']}`", "",
             f"Checkpoint: `{p['checkpoint']}` ({steps}). Corpus: `{src['name']}` ({src['frames']:,} frames, "
             f"{src['episodes']:,} episodes, {src['triplets']:,} triplets); read: {p['held_out_triplets']:,} "
             f"triplets{' with a true action' if 'probe_acc' in p else ''} of its {src['held_out_episodes']:,} "
             "held-out episodes (the checkpoint's split).", ""]
    if "probe_acc" in p:
        ceiling = f"Ceiling: `{p['ceiling']}`." if p.get("ceiling") else "Ceiling: none (--probe.ceiling false)."
        lines += probe_lines(p) + ["", ceiling, "", "![latent map by action](plots/latent_map.png)", ""]
        if p.get("per_source"):
            lines += per_source_probe_lines(p["per_source"]) + [""]
    else:
        lines += ["The corpus has no true actions: the probe, its floor and ceiling, the bits, the code-action NMI "
                  "and the table of codes against actions need them. What follows holds in any case.", ""]
    if "code_action_table" in p:
        lines += code_action_lines(p["code_action_table"]) + [""]
    if "codebooks" in p:
        lines += codebook_lines(p["codebooks"]) + [""]
    else:
        lines += ["The model has no discrete codes (--model.vq.enabled false): no codebook use, table or atlas.", ""]
    if "atlas" in p:
        lines += atlas_lines(p["atlas"]) + [""]
    return "\n".join(lines)


def code_action_lines(table: dict[str, Any]) -> list[str]:
    """The most used code tuples against the true actions, as counts of held-out triplets."""
    lines = ["## Codes against true actions", "",
             "Held-out triplets of each code tuple (rows, most used first) by the action taken (columns).", "",
             "| code tuple | " + " | ".join(table["action_names"]) + " |",
             "|---|" + "---|" * len(table["actions"])]
    for code, row in zip(table["codes"], table["counts"]):
        name = code if code.startswith("other") else f"`{code}`"
        lines.append(f"| {name} | " + " | ".join(str(n) for n in row) + " |")
    return lines + ["", "![codes against actions](plots/code_action.png)"]


def codebook_lines(books: list[dict[str, Any]]) -> list[str]:
    """Each codebook's use on the held-out triplets."""
    lines = ["## Codebooks", "", "| codebook | codes | used | dead (never chosen here) | perplexity | "
             "most used code's share |", "|---|---|---|---|---|---|"]
    lines += [f"| {b['codebook']} | {b['codes']} | {b['used']} | {b['dead']} | {b['perplexity']:.2f} | "
              f"{100 * b['top_share']:.1f}% |" for b in books]
    return lines + ["", "![latent map by code](plots/latent_map_codes.png)"]
