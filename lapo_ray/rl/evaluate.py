"""Evaluate a fine-tuned (``jobs/finetune.py``) or offline-decoded (``jobs/decode.py``) agent."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pyarrow.fs as pafs
import torch

from lapo_ray import MissingPathError, UsageError, storage
from lapo_ray.config import config_from_dict
from lapo_ray.config.rl import EnvConfig, EvaluateConfig
from lapo_ray.evaluation.rollout import evaluate_on_both_level_sets
from lapo_ray.rl.algo import CHECKPOINT_DIR
from lapo_ray.rl.decode import MODULE_DIR, agent_logits


def load_agent(agent_uri: str):
    """(module, agent config dict) from a finetune or decode artifact folder."""
    # lazy, RLlib: jobs import this before they check their input (architecture.md, Imports)
    from ray.rllib.core.rl_module.rl_module import RLModule

    config_uri = storage.join(agent_uri, "config.json")
    if not storage.exists(config_uri):
        raise MissingPathError(f"{agent_uri}: not a finetune or decode artifact folder (no config.json)")
    agent_cfg = storage.read_json(config_uri)
    if agent_cfg.get("variant") == "offline-decoded":
        module_uri = storage.join(agent_uri, MODULE_DIR)
    else:
        from ray.rllib.core import (COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE,
                                    DEFAULT_MODULE_ID)

        # The module's place inside an Algorithm checkpoint, named by RLlib's own component names.
        module_uri = storage.join(agent_uri, CHECKPOINT_DIR, COMPONENT_LEARNER_GROUP, COMPONENT_LEARNER,
                                  COMPONENT_RL_MODULE, DEFAULT_MODULE_ID)
    if not storage.exists(module_uri):
        raise MissingPathError(f"{agent_uri}: no trained agent at {module_uri}; has the job finished a checkpoint?")
    fs, path = storage.resolve(module_uri)
    with tempfile.TemporaryDirectory() as d:
        if not storage.is_local(module_uri):
            pafs.copy_files(path, d, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            path = d
        module = RLModule.from_checkpoint(os.path.abspath(path))
    return module.eval(), agent_cfg


def evaluate_agent(cfg: EvaluateConfig) -> dict[str, Any]:
    module, agent_cfg = load_agent(cfg.agent)
    env = config_from_dict(EnvConfig, agent_cfg["env"])
    name = agent_cfg.get("variant", "agent")
    report = {
        "agent": cfg.agent, "variant": name,
        **evaluate_on_both_level_sets(agent_logits(module), env, cfg.eval, name),
    }
    storage.write_json(storage.join(cfg.out or cfg.agent, "evaluation.json"), report)
    return report


class AgentPolicy:
    """A trained agent as a collection policy (``--collect.policy agent:PATH``): samples from its
    action distribution, as the agent does in the environment."""

    def __init__(self, agent_uri: str, num_envs: int, seed: int = 0):
        if not agent_uri:
            raise UsageError("policy 'agent:': give the agent folder, as agent:PATH")
        torch.set_num_threads(1)  # one collector per CPU; procgen steps in its own thread
        module, _ = load_agent(agent_uri)
        self._logits = agent_logits(module)
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, obs):
        with torch.no_grad():
            probs = torch.softmax(self._logits(torch.from_numpy(obs)).float(), -1)
        return torch.multinomial(probs, 1, generator=self._gen).squeeze(-1).numpy().astype("int64")

    def reset(self, mask) -> None:
        pass


# What the jobs hand to corpus collection for ``--collect.policy PREFIX:ARG`` specs whose policy
# lives above the data layer.
POLICY_FACTORIES = {"agent": AgentPolicy}
