"""IMPALA CNN (Espeholt et al. 2018) as used by LAPO for the IDM and the latent policy, plus the
conversion of uint8 frames into model input."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def frames_to_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (..., H, W, C) -> float (..., C, H, W) in [-0.5, 0.5].

    This is the official LAPO normalisation (`obs / 255 - 0.5`), which also matches the world
    model's `tanh / 2` output range. A float tensor is taken to hold raw pixel values in
    [0, 255] (what RLlib hands over after casting a uint8 observation), never [0, 1].
    """
    x = frames.float() / 255.0 - 0.5
    return x.movedim(-1, -3)


def stack_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T*C, H, W) in channels-last memory, the fast layout for CPU convs."""
    b, t, c, h, w = x.shape
    return x.reshape(b, t * c, h, w).contiguous(memory_format=torch.channels_last)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-activation residual: relu inside the branch only, so the skip path stays linear.
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ConvSequence(nn.Module):
    """conv 3x3 -> maxpool 3x3/2 -> 2 residual blocks; halves the spatial size (rounding up)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.res0 = ResidualBlock(out_channels)
        self.res1 = ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv(x), kernel_size=3, stride=2, padding=1)
        return self.res1(self.res0(x))


class ImpalaCNN(nn.Module):
    """Conv sequences -> flatten -> relu -> linear -> relu: (B, in_channels, S, S) -> (B, features).

    `scale` multiplies every entry of `channels` (LAPO uses 4 x (16, 32, 32) = (64, 128, 128)).
    """

    def __init__(
        self,
        in_channels: int,
        frame_size: int,
        scale: int = 4,
        channels: tuple[int, ...] = (16, 32, 32),
        features: int = 256,
    ):
        super().__init__()
        seqs = []
        size = frame_size
        for ch in channels:
            seqs.append(ConvSequence(in_channels, scale * ch))
            in_channels = scale * ch
            size = (size + 1) // 2
        self.convs = nn.Sequential(*seqs)
        self.fc = nn.Linear(in_channels * size * size, features)
        self.out_features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(torch.flatten(self.convs(x), 1))
        return F.relu(self.fc(x))
