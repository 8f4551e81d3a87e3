"""Stage-1 model (IDM + world model trained jointly) and the factory for all LAPO models."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lapo_ray.config.models import ModelConfig
from lapo_ray.models.idm import IDM
from lapo_ray.models.impala import frames_to_input, stack_frames
from lapo_ray.models.policy import LatentPolicy
from lapo_ray.models.world_model import WorldModel


class LatentDynamics(nn.Module):
    """IDM + world model. The world model must reconstruct o[t+1] from o[t-1], o[t] and the IDM's
    quantised latent, so the latent is forced to carry what changed; the VQ bottleneck keeps it
    from simply carrying o[t+1] itself."""

    def __init__(self, cfg: ModelConfig, num_actions: int = 0):
        super().__init__()
        self.cfg = cfg
        channels, size = cfg.channels, cfg.frame_size
        self.idm = IDM(cfg.idm, cfg.vq, in_channels=3 * channels, frame_size=size)
        self.wm = WorldModel(2 * channels, channels, cfg.latent_dim, size, cfg.wm.base_channels, norm=cfg.wm.norm)
        # Only with --stage1.action-labels (``num_actions`` > 0): a linear map from the latent the
        # world model sees to the actions, as in LAOM, so the few labels shape that latent itself.
        # It reads the quantised latent (straight-through): a head before quantisation pulls the
        # action into directions the codes do not follow (measured: docs/results/choices.md).
        self.action_head = nn.Linear(cfg.latent_dim, num_actions) if num_actions > 0 else None
        # Conv weights in channels-last too, matching the input, so no convolution converts its
        # layout on every call (measured: docs/results/choices.md).
        self.to(memory_format=torch.channels_last)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames: uint8 (B, 3, H, W, C) holding o[t-1], o[t], o[t+1].

        Returns `loss` (= wm_loss + vq_loss), `wm_loss` (MSE on frames scaled to [-0.5, 0.5]),
        `vq_loss` (weighted commitment), `latent`, `latent_q`, `codes`, `pred` (predicted o[t+1],
        float (B, C, H, W) in [-0.5, 0.5]), `perplexity` and `usage` (per codebook).
        """
        x = frames_to_input(frames)  # (B, 3, C, H, W)
        out = self.idm(stack_frames(x))
        pred = self.wm(stack_frames(x[:, :2]), out["latent_q"])
        target = x[:, 2].contiguous(memory_format=torch.channels_last)
        wm_loss = F.mse_loss(pred.float(), target)
        out.update(pred=pred, wm_loss=wm_loss, loss=wm_loss + out["vq_loss"])
        return out

    def action_logits(self, frames: torch.Tensor) -> torch.Tensor:
        """The label head on uint8 triplets (B, 3, H, W, C) -> (B, num_actions) logits, with gradients into
        the IDM. The codebook is left alone: its EMA follows the unlabelled stream only."""
        if self.action_head is None:
            raise RuntimeError("this LatentDynamics was built without an action head (--stage1.action-labels 0)")
        out = self.idm(stack_frames(frames_to_input(frames)), update_codebook=False)
        return self.action_head(out["latent_q"].float())

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Label triplets: frames uint8 (B, 3, H, W, C) -> (continuous latent (B, latent_dim),
        codes (B, num_codebooks, num_discrete_latents)). Never touches the codebook, whatever the
        module's mode (the IDM has no other train/eval-dependent layer)."""
        out = self.idm(stack_frames(frames_to_input(frames)), update_codebook=False)
        return out["latent"], out["codes"]


class Models(NamedTuple):
    dynamics: LatentDynamics
    policy: LatentPolicy


def build_models(cfg: ModelConfig) -> Models:
    return Models(
        dynamics=LatentDynamics(cfg),
        policy=LatentPolicy(cfg.policy, cfg.latent_dim, cfg.channels, cfg.frame_size),
    )


def num_params(module: nn.Module) -> int:
    """Trainable parameters only, as the official code reports them (torchinfo): the VQ codebook
    is a buffer and is not counted."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
