"""Latent inverse dynamics model: which (quantised) latent action explains o[t] -> o[t+1]?"""

from __future__ import annotations

import torch
import torch.nn as nn

from lapo_ray.config.models import IDMConfig, VQConfig
from lapo_ray.models.impala import ImpalaCNN
from lapo_ray.models.vq import VQEmbeddingEMA


class IDM(nn.Module):
    """IMPALA CNN over o[t-1], o[t], o[t+1] stacked on channels -> linear -> VQ-EMA.

    Seeing o[t-1] as well lets the IDM read velocities, so the latent need not encode them.
    """

    def __init__(self, cfg: IDMConfig, vq_cfg: VQConfig, in_channels: int, frame_size: int):
        super().__init__()
        self.encoder = ImpalaCNN(in_channels, frame_size, cfg.impala_scale, cfg.impala_channels, cfg.impala_features)
        self.head = nn.Linear(cfg.impala_features, vq_cfg.latent_dim)
        self.vq = VQEmbeddingEMA(vq_cfg)

    def forward(self, x: torch.Tensor, update_codebook: bool | None = None) -> dict[str, torch.Tensor]:
        """x: float (B, 3*C, H, W) normalised frames. `update_codebook` defaults to `self.training`.

        Returns `latent` (continuous, B x latent_dim), `latent_q` (quantised, straight-through),
        `codes` (B, num_codebooks, num_discrete_latents), `vq_loss`, `perplexity`, `usage`.
        """
        latent = self.head(self.encoder(x))
        if not self.vq.cfg.enabled:
            return self._continuous(latent)
        latent_q, latent, codes, vq = self.vq(latent, update=update_codebook)
        return {
            "latent": latent,
            "latent_q": latent_q,
            "codes": codes,
            "vq_loss": vq["loss"],
            "perplexity": vq["perplexity"],
            "usage": vq["usage"],
        }

    def _continuous(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """No bottleneck: the world model sees the latent itself. Zero codes keep the output's
        shape for code consumers; zero loss and perplexity keep the metric set fixed."""
        vq_cfg = self.vq.cfg
        latent = latent.float()
        zero = latent.new_zeros(())
        return {
            "latent": latent,
            "latent_q": latent,
            "codes": torch.zeros(latent.shape[0], vq_cfg.num_codebooks, vq_cfg.num_discrete_latents,
                                 dtype=torch.int64, device=latent.device),
            "vq_loss": zero,
            "perplexity": latent.new_zeros(vq_cfg.num_codebooks),
            "usage": latent.new_zeros(vq_cfg.num_codebooks),
        }
