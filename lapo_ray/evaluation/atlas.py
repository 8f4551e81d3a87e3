"""The latent-action atlas: what the trained world model does with each of the most used latent actions.

Every row is one latent action (a code tuple, ranked by its share of the held-out triplets),
applied to the same few held-out contexts (o[t-1], o[t]): its latent is the codebook vectors of
its codes, exactly what the world model saw in training for a triplet given those codes. Each
cell pair shows the predicted o[t+1] and its change from o[t] as a signed difference (red
brighter, blue darker, one scale for the whole figure, set by the predictions), so rows that move
the camera, the agent or nothing can be told apart at a glance. The models come in as callables (this room sits below
the models' loaders): ``predict(o_prev, o_now, z)`` -> uint8 frames and ``code_latent(codes)`` -> z.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lapo_ray.evaluation.latents import action_name, latent_actions
from lapo_ray.evaluation.plots import pyplot, save_figure

Predict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
CodeLatent = Callable[[np.ndarray], np.ndarray]


def atlas_rows(codes: np.ndarray, actions: np.ndarray | None, sample: dict[str, np.ndarray], predict: Predict,
               code_latent: CodeLatent, rows: int = 8) -> dict[str, Any]:
    """The atlas of the ``rows`` most used code tuples of ``codes`` (N, num_codebooks,
    num_discrete_latents) on the held-out contexts of ``sample`` (``ContextSample.take``:
    ``frames`` uint8 (K, 3, H, W, C), ``action``). Returns ``latent_actions``' ranking with each
    row's ``predicted`` o[t+1] (K, H, W, C) uint8, the contexts and their true actions."""
    ranking = latent_actions(codes, actions, rows)
    contexts = sample["frames"]
    k = len(contexts)
    top = ranking["top"]
    if k and top:
        tuples = np.asarray([r["code"] for r in top], np.int64)
        z = np.repeat(code_latent(tuples), k, axis=0)  # row-major: every context of row 0, then row 1
        o_prev, o_now = np.tile(contexts[:, 0], (len(top), 1, 1, 1)), np.tile(contexts[:, 1], (len(top), 1, 1, 1))
        predicted = predict(o_prev, o_now, z).reshape(len(top), k, *contexts.shape[2:])
        for row, frames in zip(top, predicted):
            row["predicted"] = frames
    return {**ranking, "contexts": contexts, "context_actions": sample["action"]}


def atlas_summary(atlas: dict[str, Any]) -> dict[str, Any]:
    """The atlas's figures for probe.json: its rows without their frames."""
    return {"distinct": atlas["distinct"], "triplets": atlas["triplets"], "contexts": int(len(atlas["contexts"])),
            "rows": [{k: v for k, v in r.items() if k != "predicted"} for r in atlas["top"]]}


def signed_change(frames: np.ndarray, base: np.ndarray) -> np.ndarray:
    """frames - base per pixel, averaged over the colour channels, in [-1, 1]."""
    return (frames.astype(np.float32) - base.astype(np.float32)).mean(-1) / 255.0


def row_title(row: dict[str, Any], index: int) -> str:
    text = f"#{index + 1} code {row['label']}\n{100 * row['share']:.1f}% of triplets"
    if "action" in row:
        text += f"\n{row['action_name']} {100 * row['action_share']:.0f}%"
    return text


def plot_atlas(atlas: dict[str, Any], path: str, title: str = "") -> str:
    """The atlas as a PNG: a first row with each context's o[t] and its true change to o[t+1],
    then one row per latent action with the predicted o[t+1] and its change from o[t]."""
    plt = pyplot()
    contexts, top = atlas["contexts"], [r for r in atlas["top"] if "predicted" in r]
    k = len(contexts)
    changes = [signed_change(contexts[:, 2], contexts[:, 1])] + [signed_change(r["predicted"], contexts[:, 1])
                                                                 for r in top]
    # One scale for every change image, so a row that barely moves looks like it; set by the
    # predictions alone: a true change (a camera jump, a new level) is often far larger than any
    # blurred prediction, and would wash the rows out. It saturates instead.
    scale = max(float(np.percentile(np.abs(np.stack(changes[1:] or changes)), 99.5)), 1e-3)
    fig, axes = plt.subplots(len(top) + 1, 2 * k, figsize=(2.2 * k + 1.6, 1.15 * (len(top) + 1) + 0.6), squeeze=False)
    for j in range(k):
        known = int(contexts_action(atlas, j))
        taken = f"\n({action_name(known)})" if known >= 0 else ""
        _cell(axes[0, 2 * j], contexts[j, 1], f"context {j + 1}: o[t]")
        _cell(axes[0, 2 * j + 1], changes[0][j], "true o[t+1] - o[t]" + taken, scale)
    axes[0, 0].set_ylabel("held-out\ncontexts", rotation=0, ha="right", va="center", fontsize=7)
    for i, row in enumerate(top, start=1):
        for j in range(k):
            _cell(axes[i, 2 * j], row["predicted"][j], "predicted o[t+1]" if i == 1 else "")
            _cell(axes[i, 2 * j + 1], changes[i][j], "change from o[t]" if i == 1 else "", scale)
        axes[i, 0].set_ylabel(row_title(row, i - 1), rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title or f"latent-action atlas: the {len(top)} most used of {atlas['distinct']} code tuples "
                 f"({atlas['triplets']} held-out triplets)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def contexts_action(atlas: dict[str, Any], j: int) -> int:
    actions = atlas.get("context_actions")
    return -1 if actions is None or j >= len(actions) else int(actions[j])


def _cell(ax, image: np.ndarray, title: str, scale: float | None = None) -> None:
    if scale is None:
        gray = image.ndim == 3 and image.shape[-1] == 1
        ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, interpolation="nearest")
    else:
        ax.imshow(image, cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=6)
