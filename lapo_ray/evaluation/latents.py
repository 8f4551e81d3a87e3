"""What a stage-1 IDM's discrete latent actions are, on held-out triplets, without any training.

A triplet's latent action is its whole code tuple (``num_codebooks x num_discrete_latents``
code indices): that tuple is what the world model sees. Here: how each codebook is used
(``codebook_usage``), the tuples ranked by use with the true action each most often stands for
(``latent_actions``), the table of tuples against true actions (``code_action_table``), and a
seeded sample of held-out contexts for the atlas (``ContextSample``). The probe's accuracies and
the code-action NMI are ``probe.py``'s.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lapo_ray.envs import ACTION_NAMES


def action_name(action: int) -> str:
    """Procgen's name of an action index; any other index as itself (a corpus of another action set)."""
    return ACTION_NAMES[action] if 0 <= action < len(ACTION_NAMES) else str(action)


def code_label(code: np.ndarray) -> str:
    """A code tuple (num_codebooks, num_discrete_latents) as text: codebooks apart by ``/``,
    the latents of one codebook by ``,`` (``3,7/1,12``); no ``|``, which would split a markdown
    table's cell."""
    return "/".join(",".join(str(int(c)) for c in row) for row in np.asarray(code).reshape(np.shape(code)[0], -1))


def codebook_usage(codes: np.ndarray, num_embs: int) -> list[dict[str, Any]]:
    """Per codebook, over every latent of every triplet: codes used, dead (never chosen here),
    perplexity (exp of the usage entropy: the number of equally used codes that would give it)
    and the most used code's share. codes: int (N, num_codebooks, num_discrete_latents)."""
    codes = np.asarray(codes)
    rows = []
    for c in range(codes.shape[1]):
        counts = np.bincount(codes[:, c].reshape(-1), minlength=num_embs).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        rows.append({"codebook": c, "codes": int(num_embs), "used": int((counts > 0).sum()),
                     "dead": int((counts == 0).sum()), "perplexity": float(math.exp(-(p * np.log(p)).sum())),
                     "top_share": float(counts.max() / counts.sum())})
    return rows


def ranked_tuples(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct code tuples by use, most used first (ties: the smaller tuple first), their
    counts, and each triplet's rank. codes: (N, num_codebooks, num_discrete_latents)."""
    codes = np.asarray(codes)
    uniq, inverse, counts = np.unique(codes.reshape(len(codes), -1), axis=0, return_inverse=True,
                                      return_counts=True)
    order = np.argsort(-counts, kind="stable")  # np.unique sorts the tuples, so ties stay in tuple order
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return uniq[order].reshape(-1, *codes.shape[1:]), counts[order], rank[inverse.reshape(-1)]


def latent_actions(codes: np.ndarray, actions: np.ndarray | None, top: int) -> dict[str, Any]:
    """The ``top`` most used code tuples: each with its share of the triplets and, where
    ``actions`` are known (>= 0), the true action it most often stands for and that action's
    share of its triplets."""
    uniq, counts, rank = ranked_tuples(codes)
    rows = []
    for r in range(min(top, len(uniq))):
        row: dict[str, Any] = {"code": uniq[r].tolist(), "label": code_label(uniq[r]), "triplets": int(counts[r]),
                               "share": float(counts[r] / len(rank))}
        known = actions[(rank == r) & (actions >= 0)] if actions is not None else np.zeros(0, np.int64)
        if len(known):
            a = np.bincount(known)
            row.update(action=int(a.argmax()), action_name=action_name(int(a.argmax())),
                       action_share=float(a.max() / len(known)))
        rows.append(row)
    return {"distinct": int(len(uniq)), "triplets": int(len(rank)), "top": rows}


def code_action_table(codes: np.ndarray, actions: np.ndarray, top: int) -> dict[str, Any]:
    """Counts of the ``top`` most used code tuples (rows, then one row of all other tuples)
    against the true actions that occur (columns); only triplets with a known action count."""
    known = np.asarray(actions) >= 0
    codes, actions = np.asarray(codes)[known], np.asarray(actions)[known]
    uniq, _, rank = ranked_tuples(codes)
    cols = np.unique(actions)
    shown = min(top, len(uniq))
    row_of = np.minimum(rank, shown)  # every tuple past the shown ones shares the last row
    table = np.zeros((shown + 1, len(cols)), np.int64)
    np.add.at(table, (row_of, np.searchsorted(cols, actions)), 1)
    labels = [code_label(u) for u in uniq[:shown]]
    if table[shown].sum() == 0:
        table = table[:shown]
    else:
        labels.append(f"other ({len(uniq) - shown} tuples)")
    return {"codes": labels, "actions": [int(a) for a in cols], "action_names": [action_name(int(a)) for a in cols],
            "counts": table.tolist()}


class ContextSample:
    """A seeded uniform sample of ``size`` triplets from a stream seen once (reservoir sampling),
    so the atlas's contexts spread over the held-out set rather than coming from its first episode."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seen = size, 0
        self.rng = np.random.default_rng(seed)
        self.frames: list[np.ndarray] = []
        self.episodes: list[int] = []
        self.actions: list[int] = []

    def add(self, frames: np.ndarray, episode_ids: np.ndarray, actions: np.ndarray) -> None:
        for i in range(len(frames)):
            slot = self.seen if self.seen < self.size else int(self.rng.integers(self.seen + 1))
            self.seen += 1
            if slot >= self.size:
                continue
            entry = (frames[i].copy(), int(episode_ids[i]), int(actions[i]))
            if slot < len(self.frames):
                self.frames[slot], self.episodes[slot], self.actions[slot] = entry
            else:
                self.frames.append(entry[0])
                self.episodes.append(entry[1])
                self.actions.append(entry[2])

    def take(self, k: int) -> dict[str, np.ndarray]:
        """Up to ``k`` of the sample, of distinct episodes first: ``frames`` uint8 (k, 3, H, W, C)
        and ``action`` (-1 where unknown)."""
        seen: set[int] = set()
        first = [i for i in range(len(self.frames)) if not (self.episodes[i] in seen or seen.add(self.episodes[i]))]
        picks = (first + [i for i in range(len(self.frames)) if i not in first])[:k]
        if not picks:
            return {"frames": np.zeros((0, 3, 0, 0, 0), np.uint8), "action": np.zeros(0, np.int64)}
        return {"frames": np.stack([self.frames[i] for i in picks]),
                "action": np.array([self.actions[i] for i in picks], np.int64)}
