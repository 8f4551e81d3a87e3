"""How much does a latent action say about the true action?

The paper's probe: a small MLP trained on part of the held-out labelled triplets to map the latent
action to the true action, tested on the rest. Everything is split by whole episodes: the test
half, and the validation split that picks the probe's epoch, carved from the training half.
References, all on the same test half:

- the majority-action rate (what a probe that learned nothing gets);
- the floor: the same probe on an untrained IDM's latents (what a random network gives away);
- the ceiling: the same probe on the latent layer of an IDM trained on the true actions;
- the direct supervised classifier: that supervised IDM's own action head (a different instrument,
  reported next to the ceiling, not in place of it).

The headline figure is the share of the floor-to-ceiling gap the unlabelled IDM closes. Next to
it, without any training: the normalised mutual information between the discrete VQ codes and the
true actions, and the codebook perplexity. Perplexity says how many codes are used, not what they
say: pure-noise latents with dead-code splitting reach nearly the full perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lapo_ray import UsageError
from lapo_ray.config import ProbeConfig
from lapo_ray.data.triplets import SplitSpec



def episode_split(episode_ids: np.ndarray, frac: float, seed: int = 1234) -> np.ndarray:
    """Boolean mask of about ``frac`` of the triplets, by whole episodes.

    Episodes are ordered by a seeded hash and cut at the episode boundary nearest ``frac`` of the
    triplets, so no episode is on both sides even when there are only a few long ones. A single
    episode (one long video) falls back to its last ``frac`` in time.
    """
    ids = np.asarray(episode_ids)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) <= 1:
        mask = np.zeros(len(ids), bool)
        mask[len(ids) - int(round(frac * len(ids))):] = True
        return mask
    order = np.argsort(SplitSpec(0.5, seed).episode_hash(uniq))
    cum = np.cumsum(counts[order])
    cut = int(np.argmin(np.abs(cum - frac * len(ids))))
    return np.isin(ids, uniq[order[: cut + 1]])


def probe_halves(episode_ids: np.ndarray, seed: int = 1234) -> np.ndarray:
    """Boolean mask of the probe's *test* half: whole episodes, about half of the triplets."""
    return episode_split(episode_ids, 0.5, seed)


def _mlp(in_dim: int, hidden: Iterable[int], out_dim: int) -> nn.Sequential:
    layers, d = [], in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, out_dim))


@torch.no_grad()
def _evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = net(x)
    return (logits.argmax(-1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def probe_accuracy(latents: np.ndarray, actions: np.ndarray, test_mask: np.ndarray, cfg: ProbeConfig,
                   episode_ids: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """Train the probe MLP on ``~test_mask`` with early stopping and report its test accuracy.

    ``cfg.val_fraction`` of the training half (whole episodes of ``episode_ids``; each triplet its
    own episode when None) is held out to pick the epoch: training stops after ``cfg.patience``
    epochs without a better validation accuracy (ties broken by lower validation loss), and the
    reported ``probe_acc`` is the test accuracy of the best-validation epoch's weights.
    ``history`` holds every epoch's validation and test accuracy, for inspection only.
    """
    x = torch.tensor(np.asarray(latents, np.float32))
    y = torch.as_tensor(np.asarray(actions, np.int64))
    fit, val, test = _probe_splits(np.asarray(test_mask, bool), episode_ids, cfg.val_fraction)
    # Standardising by the fit split lets the probe compare latents of very different scales
    # (an untrained IDM's are tiny) on equal terms.
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(seed)
    net = _mlp(x.shape[1], cfg.hidden, int(y.max()) + 1)  # the classes the data has: any action space
    best_val_acc, best_epoch, history = _fit_early_stopped(net, x, y, (fit, val, test), cfg, seed)
    test_acc, test_xent = _evaluate(net, x[test], y[test])
    return {
        "probe_acc": test_acc,
        "probe_xent": test_xent,
        "probe_info_bits": (_prior_xent(y[fit], y[test], net[-1].out_features) - test_xent) / math.log(2),
        "probe_val_acc": best_val_acc,
        "probe_train_acc": _evaluate(net, x[fit], y[fit])[0],
        "best_epoch": best_epoch,
        "epochs_run": len(history["val_acc"]),
        "n_train": len(fit), "n_val": len(val), "n_test": len(test),
        "history": history,
    }


def _probe_splits(test_mask: np.ndarray, episode_ids: np.ndarray | None,
                  val_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the fit, validation and test triplets: validation is ``val_fraction`` of the
    training half's episodes (each triplet its own episode when ``episode_ids`` is None)."""
    ids = np.arange(len(test_mask)) if episode_ids is None else np.asarray(episode_ids)
    train_idx = np.flatnonzero(~test_mask)
    val_in_train = episode_split(ids[train_idx], val_fraction, seed=4321)
    fit, val, test = (torch.as_tensor(train_idx[~val_in_train]), torch.as_tensor(train_idx[val_in_train]),
                      torch.as_tensor(np.flatnonzero(test_mask)))
    if len(fit) == 0 or len(val) == 0 or len(test) == 0:
        raise UsageError(f"probe needs labelled triplets in fit/validation/test, got {len(fit)}/{len(val)}/{len(test)}")
    return fit, val, test


def _fit_early_stopped(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cfg: ProbeConfig,
                       seed: int) -> tuple[float, int, dict[str, list[float]]]:
    """Train ``net`` on the fit split until ``cfg.patience`` epochs pass without a better
    validation accuracy, and leave it holding the best epoch's weights, in eval mode. Returns
    that epoch's validation accuracy, the epoch, and every epoch's validation and test accuracy."""
    fit, val, test = splits
    shuffle = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xfit, yfit = x[fit], y[fit]
    best: tuple[float, float] | None = None
    best_epoch, best_state, since_best = -1, None, 0
    history: dict[str, list[float]] = {"val_acc": [], "test_acc": []}
    for epoch in range(cfg.max_epochs):
        net.train()
        perm = torch.randperm(len(xfit), generator=shuffle)
        for i in range(0, len(xfit), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(net(xfit[idx]), yfit[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        val_acc, val_loss = _evaluate(net, x[val], y[val])
        history["val_acc"].append(val_acc)
        history["test_acc"].append(_evaluate(net, x[test], y[test])[0])
        if best is None or (val_acc, -val_loss) > best:
            best, best_epoch, since_best = (val_acc, -val_loss), epoch, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    return best[0], best_epoch, history


def _prior_xent(fit_actions: torch.Tensor, test_actions: torch.Tensor, num_classes: int) -> float:
    """The test cross-entropy of the best guess without the latent (the fit split's action
    frequencies, smoothed): the probe's own less this is what the latent tells about the action.
    Unlike accuracy it moves when the latent sharpens the odds of a rare action without
    overturning the majority answer."""
    prior = torch.bincount(fit_actions, minlength=num_classes).double() + 0.5
    return -torch.log(prior / prior.sum())[test_actions].mean().item()


@torch.no_grad()
def classifier_accuracy(logits: np.ndarray, actions: np.ndarray, test_mask: np.ndarray) -> float:
    """The direct supervised classifier's accuracy on the probe's test half."""
    return float(np.mean(np.asarray(logits)[test_mask].argmax(-1) == np.asarray(actions)[test_mask]))


def majority_rate(actions: np.ndarray, test_mask: np.ndarray) -> float:
    """Accuracy on the test half of always answering the train half's most common action."""
    train_actions = np.asarray(actions)[~test_mask]
    majority = np.bincount(train_actions).argmax()
    return float(np.mean(np.asarray(actions)[test_mask] == majority))


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _mutual_information_bits(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in I(a; b) for two integer label arrays."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.bincount(ai * (bi.max() + 1) + bi, minlength=(ai.max() + 1) * (bi.max() + 1))
    return _entropy_bits(np.bincount(ai)) + _entropy_bits(np.bincount(bi)) - _entropy_bits(joint)


def code_action_nmi(codes: np.ndarray, actions: np.ndarray, permutations: int = 5, seed: int = 0) -> dict[str, Any]:
    """Normalised mutual information between the discrete code (the tuple of all code indices of
    a triplet) and the true action, with no training.

    ``nmi`` = (I(code; action) - chance) / (H(action) - chance), where chance is the plug-in
    I(code; action) with the actions shuffled (mean over ``permutations``). Normalising by
    H(action) asks how much of the action's uncertainty the code removes: 1 when the code
    determines the action (however many codes map to one action), 0 when the code is
    independent of it. The chance term removes the plug-in estimator's upward bias, which is
    large when there are many distinct code tuples per triplet (with every tuple unique, the
    plug-in I equals H(action) for any codes); ``nmi`` is None when nothing is left to measure
    (chance within 1e-9 bits of H(action)). ``nmi_plugin`` is the unadjusted I / H(action).
    """
    codes = np.asarray(codes).reshape(len(codes), -1)
    actions = np.asarray(actions)
    _, code_ids = np.unique(codes, axis=0, return_inverse=True)
    code_ids = code_ids.reshape(-1)
    h_action = _entropy_bits(np.bincount(actions))
    mi = _mutual_information_bits(code_ids, actions)
    rng = np.random.default_rng(seed)
    chance = float(np.mean([_mutual_information_bits(code_ids, rng.permutation(actions))
                            for _ in range(permutations)])) if permutations else 0.0
    room = h_action - chance
    return {
        "nmi": float((mi - chance) / room) if room > 1e-9 else None,
        "nmi_plugin": float(mi / h_action) if h_action > 0 else None,
        "mi_bits": mi, "chance_mi_bits": chance, "action_entropy_bits": h_action,
        "distinct_codes": int(code_ids.max() + 1) if len(code_ids) else 0,
    }


def codebook_perplexity(codes: np.ndarray) -> list[float]:
    """exp(entropy) of the code usage per codebook, over all triplets and latents.
    codes: (N, num_codebooks, num_discrete_latents)."""
    codes = np.asarray(codes)
    return [float(math.exp(_entropy_bits(np.bincount(codes[:, c].reshape(-1))) * math.log(2)))
            for c in range(codes.shape[1])]


@torch.no_grad()
def encode_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], frames: np.ndarray,
                      batch_size: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(frames), batch_size):
        # A copy: the frames may be a read-only view of Ray's object store, which torch warns of.
        out.append(fn(torch.from_numpy(np.array(frames[i : i + batch_size]))).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class ProbeSet:
    """Held-out labelled triplets for the probe, with the test half fixed once."""

    frames: np.ndarray  # uint8 (N, 3, H, W, C)
    actions: np.ndarray  # int64 (N,)
    test_mask: np.ndarray  # bool (N,)
    episode_ids: np.ndarray | None = None  # int64 (N,): the probe's validation split keeps episodes whole


@dataclass
class TrainingProbe:
    """The probe stage 1 reports at each report (``probe/acc``), on a small ``ProbeSet`` that
    travels with the stage's task to rank 0: ``train.stages.Stage1Task`` calls it with the IDM's
    encoder."""

    probe_set: ProbeSet
    cfg: ProbeConfig

    def __call__(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        ps = self.probe_set
        acc = probe_accuracy(encode_in_batches(encode, ps.frames), ps.actions, ps.test_mask, self.cfg,
                             episode_ids=ps.episode_ids)
        return {"probe/acc": acc["probe_acc"], "probe/train_acc": acc["probe_train_acc"],
                "probe/best_epoch": float(acc["best_epoch"])}


def gap_two_se(floor: float, n_test: int) -> float:
    """Two standard errors of the difference of two accuracies near ``floor`` on ``n_test``
    test triplets: a floor-to-ceiling gap below this is noise, not room to close."""
    p = min(max(floor, 1e-3), 1 - 1e-3)
    return 2.0 * math.sqrt(2.0 * p * (1.0 - p) / max(n_test, 1))


def gap_closed(acc: float, floor: float, ceiling: float, n_test: int | None = None) -> float | None:
    """Share of the floor-to-ceiling gap that ``acc`` closes. None when there is no gap to
    close: the ceiling is not above the floor or, given ``n_test``, not above it by more than
    two standard errors (on a corpus where one action dominates and the others look alike, a
    share of a 0.002 gap would read as a result and mean nothing)."""
    gap = ceiling - floor
    if gap <= 1e-9 or (n_test is not None and gap <= gap_two_se(floor, n_test)):
        return None
    return float((acc - floor) / gap)


def probe_report(idm_acc: dict[str, Any], floor_acc: dict[str, Any], ceiling_acc: dict[str, Any] | None,
                 majority: float, direct_classifier: float | None = None,
                 codes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """probe.json's figures. ``codes`` maps "trained"/"untrained" to {"nmi": code_action_nmi(...),
    "perplexity": codebook_perplexity(...)}."""
    report: dict[str, Any] = {
        "probe_acc": idm_acc["probe_acc"],
        "probe_best_epoch": idm_acc["best_epoch"],
        "probe_epochs_run": idm_acc["epochs_run"],
        "floor_untrained_idm": floor_acc["probe_acc"],
        "majority_rate": majority,
        "n_train": idm_acc["n_train"], "n_val": idm_acc["n_val"], "n_test": idm_acc["n_test"],
    }
    for name, acc in (("trained", idm_acc), ("untrained", floor_acc), ("supervised", ceiling_acc)):
        if acc is not None and "probe_info_bits" in acc:
            report[f"info_bits_{name}"] = acc["probe_info_bits"]
    if ceiling_acc is not None:
        report["ceiling_supervised_idm"] = ceiling_acc["probe_acc"]
        report["gap_two_se"] = gap_two_se(floor_acc["probe_acc"], idm_acc["n_test"])
        report["gap_closed"] = gap_closed(idm_acc["probe_acc"], floor_acc["probe_acc"], ceiling_acc["probe_acc"],
                                          idm_acc["n_test"])
    if direct_classifier is not None:
        report["direct_supervised_classifier"] = direct_classifier
    for name, c in (codes or {}).items():
        report[f"nmi_{name}"] = c["nmi"]["nmi"]
        report[f"nmi_{name}_detail"] = c["nmi"]
        report[f"perplexity_{name}"] = c["perplexity"]
    return report
