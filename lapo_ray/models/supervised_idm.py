"""The supervised IDM: an IDM trained on the true actions, the probe's ceiling.

Same encoder as the latent IDM (IMPALA CNN over the three stacked frames) and the same linear
layer to a ``latent_dim``-wide latent, then a linear head to the actions instead of the VQ. Stage
1's shared loop trains it (``train.stages.SupervisedIDMTask``): the same data pipeline, batch size,
number of steps, precision, device and checkpoints. The ceiling is the probe on its latent layer;
its own head's accuracy is reported beside it as the direct supervised classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lapo_ray.config import ModelConfig
from lapo_ray.models.impala import ImpalaCNN, frames_to_input, stack_frames


class SupervisedIDM(nn.Module):
    def __init__(self, cfg: ModelConfig, num_actions: int):
        super().__init__()
        idm = cfg.idm
        self.encoder = ImpalaCNN(3 * cfg.channels, cfg.frame_size, idm.impala_scale, idm.impala_channels,
                                 idm.impala_features)
        self.latent = nn.Linear(idm.impala_features, cfg.latent_dim)
        self.head = nn.Linear(cfg.latent_dim, num_actions)

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 (B, 3, H, W, C) -> the latent layer (B, latent_dim) the probe reads."""
        return self.latent(self.encoder(stack_frames(frames_to_input(frames))))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 (B, 3, H, W, C) -> action logits (B, num_actions)."""
        return self.head(self.features(frames))


def action_loss(logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy, correct count and count of rows with a known action (action >= 0), over
    those rows, all on the device (no host read inside a step); zero loss, with a gradient, when
    a batch holds none (every data-parallel rank must still step)."""
    known = actions >= 0
    n = known.sum()
    per_row = F.cross_entropy(logits.float(), actions.clamp(min=0), reduction="none")
    loss = (per_row * known).sum() / n.clamp(min=1)
    correct = ((logits.argmax(-1) == actions) & known).sum()
    return loss, correct, n
