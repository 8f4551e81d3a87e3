"""PNG plots a person would rather look at than read: loss curves, the latent-action maps, the
table of codes against true actions. The atlas is ``atlas.py``'s.

Every plot goes straight to a path or storage URI through ``save_figure``."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from lapo_ray import storage


def save_figure(fig, uri: str, dpi: int = 110) -> str:
    """Render ``fig`` as PNG to ``uri`` (path or URI, written atomically) and close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def pyplot():
    """matplotlib's pyplot on the headless Agg backend, imported only when a plot is drawn (it is
    heavy, and the backend must be chosen before pyplot is imported)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(rows: list[dict[str, Any]], path: str) -> None:
    """Stage 1 (world-model loss train/val, VQ perplexity, probe accuracy) and stage 2 losses."""
    plt = pyplot()
    s1 = [r for r in rows if r.get("stage") == "stage1"]
    s2 = [r for r in rows if r.get("stage") == "stage2"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))

    def series(rs, key):
        pts = [(r["step"], r[key]) for r in rs if key in r]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

    ax = axes[0]
    for key, label in (("train/wm_loss", "train"), ("val/wm_loss", "validation")):
        x, y = series(s1, key)
        ax.plot(x, y, marker="o", ms=3, label=label)
    ax.set(title="stage 1: world-model loss", xlabel="step", ylabel="MSE", yscale="log")
    ax.legend()
    ax = axes[1]
    for key in sorted({k for r in s1 for k in r if k.startswith("train/vq_perplexity")}):
        x, y = series(s1, key)
        ax.plot(x, y, marker="o", ms=3, label=key.split("_")[-1])
    ax.set(title="stage 1: VQ perplexity per codebook", xlabel="step")
    ax.legend()
    ax = axes[2]
    x, y = series(s1, "probe/acc")
    ax.plot(x, y, marker="o", ms=3, label="probe accuracy (held-out)")
    ax.set(title="stage 1: latent -> true action probe", xlabel="step", ylim=(0, 1))
    ax.legend()
    ax = axes[3]
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        x, y = series(s2, key)
        ax.plot(x, y, marker="o", ms=3, label=label)
    ax.set(title="stage 2: latent BC loss", xlabel="step", ylabel="MSE")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def pca_2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def plot_latent_map(latents: np.ndarray, actions: np.ndarray, path: str, title: str = "") -> None:
    """2-D PCA of latent actions, one colour per true action."""
    plt = pyplot()
    xy = pca_2d(latents)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20")
    for a in np.unique(actions):
        m = actions == a
        ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.6, color=cmap(int(a) % 20), label=str(int(a)))
    ax.set(title=title or "latent actions (PCA), coloured by true action", xlabel="PC 1", ylabel="PC 2")
    ax.legend(title="action", markerscale=3, fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def plot_latent_map_by_code(latents: np.ndarray, rank: np.ndarray, labels: list[str], path: str,
                            title: str = "") -> None:
    """2-D PCA of latent actions, one colour for each of the most used code tuples (``rank`` <
    ``len(labels)``, ``labels`` their names) and grey for all the others."""
    plt = pyplot()
    xy = pca_2d(latents)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    other = rank >= len(labels)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=3, alpha=0.25, color="0.7", label=f"other ({int(other.sum())})")
    for r, label in enumerate(labels):
        m = rank == r
        ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.7, color=cmap(r % cmap.N), label=label)
    ax.set(title=title or "latent actions (PCA), coloured by code tuple", xlabel="PC 1", ylabel="PC 2")
    ax.legend(title="code (most used first)", markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def plot_code_action_table(table: dict[str, Any], path: str, title: str = "") -> None:
    """``latents.code_action_table`` as a heat map of P(action | code tuple), each cell's share
    written in it."""
    plt = pyplot()
    counts = np.asarray(table["counts"], np.float64)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * counts.shape[1], 2.2 + 0.35 * counts.shape[0]), layout="constrained")
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(share):
        if counts[i, j]:
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if v > 0.6 else "black")
    ax.set_xticks(range(counts.shape[1]), table["action_names"], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(counts.shape[0]), [f"{c} (n={int(n)})" for c, n in zip(table["codes"], counts.sum(1))],
                  fontsize=7)
    ax.set(xlabel="true action", ylabel="code tuple", title=title or "P(action | code), % of the code's triplets")
    save_figure(fig, path)


def plot_return_curves(runs: dict[str, list[dict[str, Any]]], path: str, key: str = "episode_return_norm",
                       title: str = "normalised return (random 0, expert 1)") -> None:
    """One line per fine-tuning variant: ``key`` against environment steps, plus decoder accuracy."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, rows in runs.items():
        pts = [(r["env_steps"], r[key]) for r in rows if key in r and r[key] == r[key]]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", ms=2, label=name)
        acc = [(r["env_steps"], r["decoder_accuracy"]) for r in rows
               if r.get("decoder_accuracy") is not None and r["decoder_accuracy"] == r["decoder_accuracy"]]
        if acc:
            axes[1].plot(*zip(*acc), marker="o", ms=2, label=name)
    axes[0].axhline(0.0, color="grey", lw=0.8, ls=":")
    if key == "return_vs_demo":
        axes[0].axhline(1.0, color="grey", lw=0.8, ls="--", label="demonstrator")
    axes[0].set(title=title, xlabel="environment steps")
    axes[1].set(title="decoder accuracy vs. actions taken", xlabel="environment steps", ylim=(0, 1))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_seed_curves(runs: dict[str, list[list[dict[str, Any]]]], path: str, key: str, title: str,
                     points: int = 60) -> None:
    """Several seeds per variant: each seed as a thin line, the mean across seeds with its 95% t
    band (a variant with one seed has no band)."""
    # lazy: stats imports scipy (about a second), which the jobs that plot only returns need not load
    from lapo_ray.evaluation.stats import curve_band

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, seeds) in enumerate(runs.items()):
        colour = f"C{i}"
        curves = [[(r["env_steps"], r[key]) for r in rows if r.get(key) is not None and r[key] == r[key]]
                  for rows in seeds]
        curves = [c for c in curves if c]
        if not curves:
            continue
        for c in curves:
            ax.plot(*zip(*c), color=colour, lw=0.6, alpha=0.35)
        grid = np.linspace(min(c[0][0] for c in curves), max(c[-1][0] for c in curves), points)
        mean, half = curve_band(curves, grid)
        ax.plot(grid, mean, color=colour, lw=2, label=f"{name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            ax.fill_between(grid, mean - half, mean + half, color=colour, alpha=0.2, lw=0)
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="demonstrator")
    ax.set(title=title, xlabel="environment steps")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_offline_decoding(ks: list[int], returns: list[float], accuracies: list[float], path: str, game: str) -> None:
    """Offline decoding: return (random 0, demonstrator 1) and decoder accuracy against k."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(ks, returns, marker="o")
    axes[0].axhline(0.0, color="grey", lw=0.8, ls=":")
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].set(xscale="log", xlabel="labelled frames k", title=f"{game}: decoded latent policy, return vs demonstrator")
    axes[1].plot(ks, accuracies, marker="o", color="tab:orange")
    axes[1].set(xscale="log", xlabel="labelled frames k", ylim=(0, 1), title="decoder accuracy on held-out triplets")
    fig.tight_layout()
    save_figure(fig, path)


def plot_sweep(summary: list[dict[str, Any]], metric: str, path: str) -> None:
    """One row per configuration: the mean of ``metric`` over seeds with its 95% interval, and
    each configuration's floor-to-ceiling scale where the metric is the share of the gap."""
    plt = pyplot()
    rows = [e for e in summary if not np.isnan(e[metric])]
    # Constrained layout makes room for the configurations' names, which can be long.
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(summary), 2) + 1.4), layout="constrained")
    names = [e["configuration"] for e in rows]
    means = np.array([e[metric] for e in rows])
    halves = np.array([0.0 if np.isnan(e[f"{metric}_half"]) else e[f"{metric}_half"] for e in rows])
    y = np.arange(len(rows))
    ax.errorbar(means, y, xerr=halves, fmt="o", capsize=3)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    if metric == "gap_closed":
        for x, label in ((0.0, "floor (untrained IDM)"), (1.0, "ceiling (supervised IDM)")):
            ax.axvline(x, color="grey", lw=0.8, ls="--")
            # Along its line, so the two labels never overlap however close 0 and 1 are drawn.
            ax.text(x, 0.98, f" {label}", transform=ax.get_xaxis_transform(), rotation=90, va="top", ha="left",
                    fontsize=7, color="grey")
    ax.set_xlabel(f"{metric}: mean over seeds, 95% t interval")
    missing = [e["configuration"] for e in summary if np.isnan(e[metric])]
    ax.set_title(f"{len(rows)} configurations" + (f" ({len(missing)} with no measurable {metric})" if missing else ""))
    save_figure(fig, path)
