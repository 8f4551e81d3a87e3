"""Latent policy: predicts the IDM's continuous latent action from the current frame alone."""

from __future__ import annotations

import torch
import torch.nn as nn

from lapo_ray.config.models import PolicyConfig
from lapo_ray.models.impala import ImpalaCNN, frames_to_input


class FrameEncoder(nn.Module):
    """uint8 frames (B, H, W, C) -> (B, features): normalisation + IMPALA CNN in one module, so the
    stage-3 RLModule can reuse it on raw observations without knowing the preprocessing."""

    def __init__(self, cfg: PolicyConfig, channels: int, frame_size: int):
        super().__init__()
        self.cnn = ImpalaCNN(channels, frame_size, cfg.impala_scale, cfg.impala_channels, cfg.impala_features)
        self.out_features = cfg.impala_features
        self.to(memory_format=torch.channels_last)  # conv weights match the channels-last input

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = frames_to_input(obs).contiguous(memory_format=torch.channels_last)
        return self.cnn(x)


class LatentPolicy(nn.Module):
    """`encoder` (FrameEncoder) -> `head` (linear to latent_dim); the two are used separately in stage 3."""

    def __init__(self, cfg: PolicyConfig, latent_dim: int, channels: int, frame_size: int):
        super().__init__()
        self.encoder = FrameEncoder(cfg, channels, frame_size)
        self.head = nn.Linear(cfg.impala_features, latent_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs: uint8 (B, H, W, C) -> predicted continuous latent action (B, latent_dim)."""
        return self.head(self.encoder(obs))
