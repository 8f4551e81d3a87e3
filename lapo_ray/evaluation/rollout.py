"""Mean return of an agent (any module mapping uint8 observations to action logits) over N
Procgen episodes, on the training levels or on held-out levels.

Every env runs the same number of episodes (ceil(N / num_envs)) and only those count: taking the
first N episodes to finish would over-sample short episodes and bias the mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lapo_ray import UsageError
from lapo_ray.config.rl import EnvConfig, EvalConfig
from lapo_ray.envs import make_procgen_vector_env, normalize_return
from lapo_ray.progress import Progress


def held_out_levels(env: EnvConfig, eval_cfg: EvalConfig) -> EnvConfig:
    """Levels the agent never saw: from ``held_out_start_level`` on (a training set of
    ``num_levels`` levels starting at ``start_level`` must not overlap it)."""
    if env.num_levels and env.start_level + env.num_levels > eval_cfg.held_out_start_level:
        raise UsageError(
            f"training levels [{env.start_level}, {env.start_level + env.num_levels}) overlap the held-out "
            f"levels from {eval_cfg.held_out_start_level}; raise --eval.held-out-start-level"
        )
    return EnvConfig(game=env.game, distribution_mode=env.distribution_mode, num_levels=0,
                     start_level=eval_cfg.held_out_start_level)


@torch.no_grad()
def evaluate_policy(logits_fn: Callable[[torch.Tensor], torch.Tensor], env: EnvConfig,
                    eval_cfg: EvalConfig, label: str = "eval") -> dict[str, Any]:
    num_envs = min(eval_cfg.num_envs, eval_cfg.episodes)
    per_env = math.ceil(eval_cfg.episodes / num_envs)
    # Unbounded held-out sets (num_levels 0, start_level > 0) are not a Procgen option: a large
    # finite set starting there samples fresh levels just the same.
    num_levels = env.num_levels if env.num_levels or env.start_level == 0 else 2**31 - 1 - env.start_level
    vec = make_procgen_vector_env({"game": env.game, "num_envs": num_envs,
                                   "distribution_mode": env.distribution_mode,
                                   "num_levels": num_levels, "start_level": env.start_level,
                                   "seed": eval_cfg.seed})
    gen = torch.Generator().manual_seed(eval_cfg.seed)
    returns: list[list[float]] = [[] for _ in range(num_envs)]
    lengths: list[list[int]] = [[] for _ in range(num_envs)]
    progress = Progress(num_envs * per_env, f"{label} {env.game}", unit="episodes", interval=10)
    try:
        obs, _ = vec.reset(seed=eval_cfg.seed)
        while min(len(r) for r in returns) < per_env:
            logits = logits_fn(torch.from_numpy(obs))
            if eval_cfg.greedy:
                actions = logits.argmax(-1)
            else:
                actions = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen).squeeze(-1)
            obs, _, _, _, info = vec.step(actions.numpy().astype(np.int64))
            if "_episode" in info:
                for i in np.nonzero(info["_episode"])[0]:
                    if len(returns[i]) < per_env:
                        returns[i].append(float(info["episode"]["r"][i]))
                        lengths[i].append(int(info["episode"]["l"][i]))
                        progress.update(1)
    finally:
        vec.close()
    flat = np.array([r for rs in returns for r in rs])
    norm = np.array([normalize_return(env.game, r) for r in flat])
    progress.print()
    return {
        "game": env.game, "levels": {"num_levels": env.num_levels, "start_level": env.start_level},
        "episodes": int(len(flat)), "return_mean": float(flat.mean()), "return_std": float(flat.std()),
        "return_norm_mean": float(norm.mean()),
        "return_norm_sem": float(norm.std(ddof=1) / math.sqrt(len(norm))) if len(norm) > 1 else 0.0,
        "episode_len_mean": float(np.mean([x for ls in lengths for x in ls])),
        "greedy": eval_cfg.greedy, "seed": eval_cfg.seed,
    }


def evaluate_on_both_level_sets(logits_fn: Callable[[torch.Tensor], torch.Tensor], env: EnvConfig,
                                eval_cfg: EvalConfig, label: str) -> dict[str, Any]:
    """``{"train_levels": ..., "held_out_levels": ...}``: the agent on its own levels and on new ones."""
    return {
        "train_levels": evaluate_policy(logits_fn, env, eval_cfg, f"{label} train levels"),
        "held_out_levels": evaluate_policy(logits_fn, held_out_levels(env, eval_cfg), eval_cfg,
                                           f"{label} held-out levels"),
    }
