"""Stage-1 recipe options from the follow-up literature (see docs/recipes.md).

The functions on tensors run on the batch's own device with tensor ops only: no value is read
back to the host, so the training step stays free of syncs (see ``train/step.py``). The
action-labelled subset is chosen once, on the host, by ``triplet_hash_np``.
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


def action_label_fraction(k: int, train_triplets: int) -> float:
    """Share of the training triplets whose hash marks them action-labelled, for about ``k`` of them."""
    return 0.0 if k <= 0 or train_triplets <= 0 else min(1.0, k / train_triplets)


CAMERA_RANGE = 6  # largest camera shift searched per frame, pixels (CoinRun moves 0-5)


def shift_frames(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """x: (B, K, H, W, ...) (channels or frames as K, anything trailing rides along);
    out[b, :, i, j] = x[b, :, i + dy[b], j + dx[b]], edges repeated."""
    b, _, h, w = x.shape[:4]
    dev = x.device
    iy = (torch.arange(h, device=dev)[None, :] + dy[:, None]).clamp(0, h - 1)  # (B, H)
    ix = (torch.arange(w, device=dev)[None, :] + dx[:, None]).clamp(0, w - 1)  # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return x[bi, ci, iy[:, None, :, None], ix[:, None, None, :]]


def camera_shifts(a: torch.Tensor, b: torch.Tensor, r: int = CAMERA_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame pair, the integer (dx, dy) in [-r, r]^2 with b ~ a moved by it (b[i, j] ~
    a[i + dy, j + dx]), by the least mean squared grey difference over the central pixels.
    a, b: (B, C, H, W). Tensor ops only, so the step stays free of host syncs."""
    ga, gb = a.mean(1), b.mean(1)
    h, w = gb.shape[1:]
    centre = gb[:, r:h - r, r:w - r]
    errs = torch.stack([((ga[:, r + dy:h - r + dy, r + dx:w - r + dx] - centre) ** 2).mean((1, 2))
                        for dy in range(-r, r + 1) for dx in range(-r, r + 1)], 1)  # (B, (2r+1)^2)
    k = errs.argmin(1)
    return k % (2 * r + 1) - r, torch.div(k, 2 * r + 1, rounding_mode="floor") - r


def change_weights(x: torch.Tensor, alpha: float, baseline: str = "last") -> torch.Tensor:
    """x: float (B, 3, C, H, W) frames. Per-pixel weight 1 + alpha * |o[t+1] - o[t]| (mean over
    colour channels), divided by its per-frame mean so the loss keeps the plain MSE's scale.

    ``baseline="camera"`` compares o[t+1] with o[t] moved by the camera's shift between them:
    where the camera follows the agent every pixel changes, and only what the camera's motion
    does not explain (the agent's sprite, other movers) keeps a large weight."""
    last = x[:, 1]
    if baseline == "camera":
        dx, dy = camera_shifts(x[:, 1], x[:, 2])
        last = shift_frames(x[:, 1], dx, dy)
    elif baseline != "last":
        raise ValueError(f"change baseline {baseline!r}: expected 'last' or 'camera'")
    diff = (x[:, 2] - last).abs().mean(1, keepdim=True)  # (B, 1, H, W)
    w = 1.0 + alpha * diff
    return w / w.mean(dim=(2, 3), keepdim=True)


def random_shift(frames: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ random shift of uint8 (B, 3, H, W, C) triplets: each triplet moves by one offset in
    [-pad, pad]^2 for all three of its frames (the motion between them is what the IDM reads),
    with edge pixels repeated, which is pad-by-replication followed by a random crop."""
    if pad <= 0:
        return frames
    b, dev = frames.shape[0], frames.device
    dy = torch.randint(-pad, pad + 1, (b,), device=dev, generator=generator)
    dx = torch.randint(-pad, pad + 1, (b,), device=dev, generator=generator)
    return shift_frames(frames, dx, dy)
