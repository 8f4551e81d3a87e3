"""The LAPO agent as an RLlib new-stack ``TorchRLModule``.

Layout, as in the official LAPO stage 3::

    obs --convs--> h --fc_sl--> latent_head --> latent z --decoder--> SL logits --+
                   |                                                              +--> mean --> action logits
                   +--fc_rl--> rl_head -----------------------------> RL logits --+
                                 \\--> value_head --> V(obs)

``convs``, ``fc_sl`` and ``latent_head`` are the stage-2 latent policy (``fc_rl`` starts as a copy
of its linear layer). The RL head starts at zero, so before any update the agent acts exactly as
the decoded latent policy. The mean of the two logit vectors is written as ``rl/2 + sl/2``; the
decoder is trained (online or offline) through :meth:`decoded_logits`, which already includes the
1/2, so the decoded latent policy *is* ``softmax(decoded_logits(z))`` and the agent's initial
distribution equals it exactly.

Unless ``model_config["decoder_rl_grad"]`` is set, the decoded half of the logits is detached in
the forward pass, so PPO's loss trains only the RL path (convs, trunk, RL and value heads) and the
decoder learns by supervision alone, as in the paper (see ``lapo_ray.rl.learner``).

Built without a latent-policy checkpoint (``model_config["latent_policy_checkpoint"]`` None, which
:func:`lapo_ray.rl.algo.module_spec` passes for ``--scratch true``) the module is the PPO-from-scratch
baseline: an IMPALA trunk built from ``model_config["policy"]`` with RL and value heads, and no
latent path; ``module.scratch`` says which of the two it is.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from lapo_ray import UsageError
from lapo_ray.config import PolicyConfig, config_from_dict
from lapo_ray.models import LatentPolicy
from lapo_ray.models.impala import frames_to_input
from lapo_ray.train.checkpoint import load_latent_policy

# Parameter groups, one optimiser each (PPOConfig has one PartSchedule per name).
PARTS = ("convs", "trunk", "rl_head", "value_head", "decoder")


def make_decoder(latent_dim: int, num_actions: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = latent_dim
    for h in hidden:
        layers += [nn.Linear(size, h), nn.ReLU()]
        size = h
    layers.append(nn.Linear(size, num_actions))
    return nn.Sequential(*layers)


class LapoAgentModule(TorchRLModule, ValueFunctionAPI):
    """``model_config`` keys, set by :func:`lapo_ray.rl.algo.module_spec` (online) and
    :func:`lapo_ray.rl.decode.build_agent` (offline): ``latent_policy_checkpoint`` (a stage-2
    checkpoint path or URI; None builds the from-scratch baseline), ``policy`` (a PolicyConfig dict,
    used from scratch only: a checkpoint brings its own architecture), ``decoder_hidden`` and
    ``decoder_rl_grad`` (absent, as offline decoding leaves it: False, no gradient of a loss on the
    action logits reaches the decoder path). Every env runner and learner reads the checkpoint
    itself, so on a cluster it must be a URI all nodes reach, like every other output of lapo_ray."""

    @override(TorchRLModule)
    def setup(self) -> None:
        num_actions = self.action_space.n
        height, width, channels = self.observation_space.shape
        checkpoint = self.model_config.get("latent_policy_checkpoint")
        self.scratch = checkpoint is None
        self.decoder_rl_grad = bool(self.model_config.get("decoder_rl_grad", False))
        if self.scratch:
            policy_cfg = config_from_dict(PolicyConfig, self.model_config["policy"])
            latent_policy = LatentPolicy(policy_cfg, 1, channels, height)
        else:
            latent_policy, model_cfg = load_latent_policy(checkpoint)
            if (model_cfg.frame_size, model_cfg.channels) != (height, channels):
                raise UsageError(
                    f"latent policy {checkpoint} was trained on {model_cfg.frame_size}x{model_cfg.frame_size}x"
                    f"{model_cfg.channels} frames, the env gives {height}x{width}x{channels}"
                )
        cnn = latent_policy.encoder.cnn
        self.convs = cnn.convs
        self.fc_rl = cnn.fc
        self.rl_head = nn.Linear(cnn.out_features, num_actions)
        self.value_head = nn.Linear(cnn.out_features, 1)
        nn.init.zeros_(self.rl_head.weight)
        nn.init.zeros_(self.rl_head.bias)
        if not self.scratch:
            # The SL path keeps the latent policy as it was trained; only the decoder learns on it.
            self.fc_sl = copy.deepcopy(cnn.fc).requires_grad_(False)
            self.latent_head = latent_policy.head.requires_grad_(False)
            self.decoder = make_decoder(latent_policy.head.out_features, num_actions,
                                        tuple(self.model_config["decoder_hidden"]))
        self.to(memory_format=torch.channels_last)

    # -- parts -------------------------------------------------------------------------------
    def part_parameters(self, part: str) -> list[nn.Parameter]:
        modules = {
            "convs": [self.convs],
            "trunk": [self.fc_rl],
            "rl_head": [self.rl_head],
            "value_head": [self.value_head],
            "decoder": [] if self.scratch else [self.decoder],
        }[part]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    # -- the network -------------------------------------------------------------------------
    def _features(self, obs: torch.Tensor) -> torch.Tensor:
        x = frames_to_input(obs).contiguous(memory_format=torch.channels_last)
        return F.relu(torch.flatten(self.convs(x), 1))

    def latent_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The stage-2 latent policy's prediction z for uint8 observations (B, H, W, C)."""
        return self.latent_head(F.relu(self.fc_sl(self._features(obs))))

    def decoded_logits(self, latent: torch.Tensor) -> torch.Tensor:
        """The decoded latent policy's logits for latent actions (its half of the mean)."""
        return 0.5 * self.decoder(latent)

    def _heads(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self._features(obs)
        hidden_rl = F.relu(self.fc_rl(h))
        logits = self.rl_head(hidden_rl)
        if not self.scratch:
            latent = self.latent_head(F.relu(self.fc_sl(h)))
            decoded = self.decoded_logits(latent)
            logits = 0.5 * logits + (decoded if self.decoder_rl_grad else decoded.detach())
        return {Columns.ACTION_DIST_INPUTS: logits, Columns.EMBEDDINGS: hidden_rl}

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        out = self._heads(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: out[Columns.ACTION_DIST_INPUTS]}

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._heads(batch[Columns.OBS])

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            embeddings = F.relu(self.fc_rl(self._features(batch[Columns.OBS])))
        return self.value_head(embeddings).squeeze(-1)
