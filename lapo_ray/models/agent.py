"""A trained agent as a plain PyTorch network and file, for machines without Ray.

The agent of stage 3 is an RLlib ``TorchRLModule`` (``rl.module.LapoAgentModule``), which takes
RLlib to build and its checkpoint format to load. ``AgentNet`` is the same network with the same
parameter names (``convs``, ``fc_rl``, ``rl_head``, ``value_head`` and, for an agent decoded from a
latent policy, ``fc_sl``, ``latent_head``, ``decoder``), so the module's ``state_dict`` loads into it
strictly and it gives the module's action logits. ``save_agent_file`` writes one ``torch.save``
file of plain types and tensors (``torch.load(weights_only=True)`` reads it); ``jobs/export.py
--agent`` writes it from an agent folder (``rl.export.export_agent``), and the paper-scale command
(``jobs/benchmark.py paper --demonstrator FILE``) plays the demonstrator from it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lapo_ray import MissingPathError, UsageError
from lapo_ray.config.models import PolicyConfig
from lapo_ray.models.impala import ImpalaCNN, frames_to_input

FORMAT = "lapo_ray-agent"
VERSION = 1


def decoder_mlp(latent_dim: int, num_actions: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """The decoder's layers as ``rl.module.make_decoder`` builds them (same indices, same keys)."""
    layers: list[nn.Module] = []
    size = latent_dim
    for h in hidden:
        layers += [nn.Linear(size, h), nn.ReLU()]
        size = h
    return nn.Sequential(*layers, nn.Linear(size, num_actions))


class AgentNet(nn.Module):
    """The agent's network: obs uint8 (B, H, W, C) -> action logits, as the RLModule computes them
    (the from-scratch agent: its RL head; a decoded agent: half its RL head plus the decoded half)."""

    def __init__(self, policy: PolicyConfig, num_actions: int, frame_shape: tuple[int, int, int],
                 latent_dim: int | None = None, decoder_hidden: tuple[int, ...] = ()):
        super().__init__()
        height, _, channels = frame_shape
        cnn = ImpalaCNN(channels, height, policy.impala_scale, policy.impala_channels, policy.impala_features)
        self.convs, self.fc_rl = cnn.convs, cnn.fc
        self.rl_head = nn.Linear(cnn.out_features, num_actions)
        self.value_head = nn.Linear(cnn.out_features, 1)
        self.scratch = latent_dim is None
        if not self.scratch:
            self.fc_sl = nn.Linear(cnn.fc.in_features, cnn.out_features)
            self.latent_head = nn.Linear(cnn.out_features, latent_dim)
            self.decoder = decoder_mlp(latent_dim, num_actions, tuple(decoder_hidden))
        self.to(memory_format=torch.channels_last)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = frames_to_input(obs).contiguous(memory_format=torch.channels_last)
        h = F.relu(torch.flatten(self.convs(x), 1))
        logits = self.rl_head(F.relu(self.fc_rl(h)))
        if self.scratch:
            return logits
        return 0.5 * logits + 0.5 * self.decoder(self.latent_head(F.relu(self.fc_sl(h))))


def agent_record(net_state: dict[str, torch.Tensor], policy: PolicyConfig, num_actions: int,
                 frame_shape: tuple[int, int, int], latent_dim: int | None, decoder_hidden: tuple[int, ...],
                 about: dict[str, Any]) -> dict[str, Any]:
    """What ``save_agent_file`` writes: the weights and everything ``AgentNet`` is built from."""
    return {"format": FORMAT, "version": VERSION, "policy": dataclasses.asdict(policy), "num_actions": int(num_actions),
            "frame_shape": [int(s) for s in frame_shape], "latent_dim": latent_dim,
            "decoder_hidden": [int(h) for h in decoder_hidden], "about": about,
            "state_dict": {k: v.detach().cpu().clone() for k, v in net_state.items()}}


def save_agent_file(record: dict[str, Any], path: str) -> None:
    """``record`` (``agent_record``) at ``path``, in place only once whole."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(record, tmp)
    os.replace(tmp, path)


def load_agent_file(path: str, device: torch.device | str = "cpu") -> tuple[AgentNet, dict[str, Any]]:
    """(the agent in eval mode on ``device``, the file's record without its weights)."""
    if not os.path.isfile(path):
        raise MissingPathError(f"{path}: no such agent file (write one with jobs/export.py --agent)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, a file of something else
        first = (str(e).strip().splitlines() or [""])[0]  # torch's pickling errors run to a page
        raise UsageError(f"{path}: not a readable agent file ({type(e).__name__}: {first})") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UsageError(f"{path}: not a lapo_ray agent file (write one with jobs/export.py --agent)")
    policy = PolicyConfig(**{**record["policy"], "impala_channels": tuple(record["policy"]["impala_channels"])})
    net = AgentNet(policy, record["num_actions"], tuple(record["frame_shape"]), record["latent_dim"],
                   tuple(record["decoder_hidden"]))
    net.load_state_dict(record["state_dict"])
    return net.to(device).eval(), {k: v for k, v in record.items() if k != "state_dict"}
