"""How much does a latent action say about the true action?

The paper's probe: a small MLP trained on half of the held-out labelled triplets to map the
latent action to the true action, tested on the other half. Three references are measured the
same way on the same test half: the majority-action rate, the probe on an untrained IDM's latents
(the floor: what a random network's features give away), and the IDM architecture trained on the
true actions with the same data and steps (the ceiling). The headline figure is the share of
the floor-to-ceiling gap that the unlabelled IDM closes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lapo_ray.config import ProbeConfig
from lapo_ray.data.triplets import SplitSpec

NUM_ACTIONS = 15


def probe_halves(episode_ids: np.ndarray, seed: int = 1234) -> np.ndarray:
    """Boolean mask of the probe's *test* half: whole episodes, about half of the triplets.

    Episodes are ordered by a seeded hash and cut at the episode boundary nearest the middle, so
    no episode is in both halves even when there are only a few long ones.
    """
    ids = np.asarray(episode_ids)
    uniq, counts = np.unique(ids, return_counts=True)
    order = np.argsort(SplitSpec(0.5, seed).episode_hash(uniq))
    cum = np.cumsum(counts[order])
    cut = int(np.argmin(np.abs(cum - len(ids) / 2)))
    test_eps = uniq[order[: cut + 1]] if len(uniq) > 1 else uniq[:0]
    if len(uniq) == 1:  # one long episode (a single video): fall back to time halves
        mask = np.zeros(len(ids), bool)
        mask[len(ids) // 2 :] = True
        return mask
    return np.isin(ids, test_eps)


def _mlp(in_dim: int, hidden: Iterable[int], out_dim: int) -> nn.Sequential:
    layers, d = [], in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, out_dim))


def probe_accuracy(latents: np.ndarray, actions: np.ndarray, test_mask: np.ndarray,
                   cfg: ProbeConfig, seed: int = 0) -> dict[str, float]:
    """Train the probe MLP on ``~test_mask`` and report its accuracy on ``test_mask``."""
    x = torch.tensor(np.asarray(latents, np.float32))
    y = torch.as_tensor(np.asarray(actions, np.int64))
    tr, te = ~torch.as_tensor(test_mask), torch.as_tensor(test_mask)
    if tr.sum() == 0 or te.sum() == 0:
        raise ValueError("probe needs labelled triplets in both halves")
    # Standardising by the train half lets the probe compare latents of very different scales
    # (an untrained IDM's are tiny) on equal terms.
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    x = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _mlp(x.shape[1], cfg.hidden, NUM_ACTIONS)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    xtr, ytr = x[tr], y[tr]
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_acc = (net(xtr).argmax(-1) == ytr).float().mean().item()
        test_acc = (net(x[te]).argmax(-1) == y[te]).float().mean().item()
    return {"probe_acc": test_acc, "probe_train_acc": train_acc,
            "n_train": int(tr.sum()), "n_test": int(te.sum())}


def majority_rate(actions: np.ndarray, test_mask: np.ndarray) -> float:
    """Accuracy on the test half of always answering the train half's most common action."""
    train_actions = np.asarray(actions)[~test_mask]
    majority = np.bincount(train_actions, minlength=NUM_ACTIONS).argmax()
    return float(np.mean(np.asarray(actions)[test_mask] == majority))


@torch.no_grad()
def encode_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], frames: np.ndarray,
                      batch_size: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(frames), batch_size):
        out.append(fn(torch.from_numpy(frames[i : i + batch_size])).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def gap_closed(acc: float, floor: float, ceiling: float) -> float | None:
    """Share of the floor-to-ceiling gap that ``acc`` closes (None when the ceiling does not
    rise above the floor, so there is no gap to close)."""
    gap = ceiling - floor
    return float((acc - floor) / gap) if gap > 1e-9 else None


def probe_report(idm_acc: dict[str, float], floor_acc: dict[str, float], ceiling_acc: float | None,
                 majority: float) -> dict[str, Any]:
    report = {
        "probe_acc": idm_acc["probe_acc"],
        "floor_untrained_idm": floor_acc["probe_acc"],
        "majority_rate": majority,
        "n_train": idm_acc["n_train"], "n_test": idm_acc["n_test"],
    }
    if ceiling_acc is not None:
        report["ceiling_supervised_idm"] = ceiling_acc
        report["gap_closed"] = gap_closed(idm_acc["probe_acc"], floor_acc["probe_acc"], ceiling_acc)
    return report
