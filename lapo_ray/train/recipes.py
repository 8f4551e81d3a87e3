"""Stage-1 recipe options from the follow-up literature (see docs/recipes.md).

The functions on tensors run on the batch's own device with tensor ops only: no value is read
back to the host, so the training step stays free of syncs (see ``train/step.py``). The labelled
subset is chosen once, on the host, by ``triplet_hash_np``.
"""

from __future__ import annotations

import numpy as np
import torch

# Hash arithmetic stays below 2**62, so int64 never overflows.
_P = 2_147_483_647  # 2**31 - 1


def _mix(ep, step):
    x = (ep % _P) * 1_000_003 % _P
    x = (x + step % _P) % _P
    x = x * 48_271 % _P
    x = x ^ (x >> 13)
    x = x * 69_621 % _P
    x = x ^ (x >> 16)
    return x * 16_807 % _P


def triplet_hash_np(episode_id: np.ndarray, step: np.ndarray) -> np.ndarray:
    """A number in [0, 1) fixed by (episode, step): every rank, epoch and run agrees on it."""
    return _mix(np.asarray(episode_id, np.int64), np.asarray(step, np.int64)).astype(np.float64) / _P


def label_fraction(k: int, train_triplets: int) -> float:
    """Share of the training triplets whose hash marks them labelled, for about ``k`` of them."""
    return 0.0 if k <= 0 or train_triplets <= 0 else min(1.0, k / train_triplets)


def change_weights(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x: float (B, 3, C, H, W) frames. Per-pixel weight 1 + alpha * |o[t+1] - o[t]| (mean over
    colour channels), divided by its per-frame mean so the loss keeps the plain MSE's scale."""
    diff = (x[:, 2] - x[:, 1]).abs().mean(1, keepdim=True)  # (B, 1, H, W)
    w = 1.0 + alpha * diff
    return w / w.mean(dim=(2, 3), keepdim=True)


def random_shift(frames: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ random shift of uint8 (B, 3, H, W, C) triplets: each triplet moves by one offset in
    [-pad, pad]^2 for all three of its frames (the motion between them is what the IDM reads),
    with edge pixels repeated, which is pad-by-replication followed by a random crop."""
    if pad <= 0:
        return frames
    b, _, h, w, _ = frames.shape
    dev = frames.device
    dy = torch.randint(-pad, pad + 1, (b,), device=dev, generator=generator)
    dx = torch.randint(-pad, pad + 1, (b,), device=dev, generator=generator)
    iy = (torch.arange(h, device=dev)[None, :] + dy[:, None]).clamp(0, h - 1)  # (B, H)
    ix = (torch.arange(w, device=dev)[None, :] + dx[:, None]).clamp(0, w - 1)  # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    fi = torch.arange(3, device=dev)[None, :, None, None]
    return frames[bi, fi, iy[:, None, :, None], ix[:, None, None, :]]
