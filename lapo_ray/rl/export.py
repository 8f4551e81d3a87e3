"""``jobs/export.py``: a run as a folder (``train.run.export_run``), or an agent as one plain
PyTorch file (``export_agent``) that ``models.agent.load_agent_file`` reads without Ray or RLlib:
how the experiment's demonstrator reaches a GPU machine that has PyTorch alone
(``jobs/benchmark.py paper --demonstrator FILE``)."""

from __future__ import annotations

import os

import numpy as np
import torch

from lapo_ray import UsageError
from lapo_ray.config import PolicyConfig, config_from_dict
from lapo_ray.config.export import ExportConfig
from lapo_ray.models.agent import agent_record, load_agent_file, save_agent_file
from lapo_ray.rl.decode import agent_logits
from lapo_ray.rl.evaluate import load_agent
from lapo_ray.train.checkpoint import load_latent_policy
from lapo_ray.train.run import export_run


def export(cfg: ExportConfig) -> str:
    """What ``jobs/export.py`` writes: ``--run`` as a folder, or ``--agent`` as a file."""
    cfg.validate()
    if cfg.agent:
        return export_agent(cfg.agent, cfg.out, replace=cfg.replace)
    return export_run(cfg.run, cfg.out, replace=cfg.replace)


def export_agent(agent: str, out: str, replace: bool = False) -> str:
    """The agent of the folder ``agent`` (a finetune or decode output, the experiment's
    demonstrator) as one plain PyTorch file at the local path ``out``; checked before it is kept:
    the file's network gives the RLlib module's logits. Returns ``out``."""
    if "://" in out:
        raise UsageError(f"--out {out}: an agent file is written to a local path")
    if os.path.exists(out) and not replace:
        raise UsageError(f"--out {out}: exists; --replace true replaces it")
    module, agent_cfg = load_agent(agent)
    policy, latent_dim = _architecture(module, agent)
    shape = tuple(int(s) for s in module.observation_space.shape)
    decoder_hidden = () if module.scratch else tuple(module.model_config["decoder_hidden"])
    record = agent_record(module.state_dict(), policy, int(module.action_space.n), shape, latent_dim, decoder_hidden,
                          {"agent": agent, "variant": agent_cfg.get("variant", ""), "env": agent_cfg.get("env", {})})
    save_agent_file(record, out)
    _check_same_logits(module, out, shape)
    print(f"agent {agent} ({record['about']['variant'] or 'agent'}) written to {out}", flush=True)
    return out


def _architecture(module, agent: str) -> tuple[PolicyConfig, int | None]:
    """The IMPALA trunk's config and, for an agent decoded from a latent policy, its latent width."""
    if module.scratch:
        return config_from_dict(PolicyConfig, module.model_config["policy"]), None
    checkpoint = module.model_config.get("latent_policy_checkpoint")
    try:
        _, model_cfg = load_latent_policy(checkpoint)
    except (OSError, ValueError) as e:
        raise UsageError(f"{agent}: its latent policy {checkpoint} is needed to export the agent ({e})") from e
    return model_cfg.policy, int(module.latent_head.out_features)


def _check_same_logits(module, path: str, shape: tuple[int, ...]) -> None:
    """The file's network and the module agree on a few frames, or the file goes."""
    obs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, *shape), dtype=np.uint8))
    net, _ = load_agent_file(path)
    with torch.no_grad():
        want, got = agent_logits(module)(obs).float(), net(obs).float()
    if not torch.allclose(want, got, atol=1e-5, rtol=1e-4):
        os.remove(path)
        raise RuntimeError(f"the exported agent's logits differ from the module's by {(want - got).abs().max():.3g}")
