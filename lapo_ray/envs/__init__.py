"""Procgen for lapo_ray: a gymnasium/RLlib vector env and LAPO's score normalisation."""

from lapo_ray.envs.normalization import EXPERT_RETURNS, RANDOM_RETURNS, normalize_return
from lapo_ray.envs.procgen import (
    ACTION_NAMES,
    DISTRIBUTION_MODES,
    NUM_ACTIONS,
    OBS_SHAPE,
    PROCGEN_GAMES,
    ProcgenVectorEnv,
    episode_timeout,
    make_procgen_vector_env,
    register_with_rllib,
)

__all__ = [
    "ACTION_NAMES",
    "DISTRIBUTION_MODES",
    "EXPERT_RETURNS",
    "NUM_ACTIONS",
    "OBS_SHAPE",
    "PROCGEN_GAMES",
    "RANDOM_RETURNS",
    "ProcgenVectorEnv",
    "episode_timeout",
    "make_procgen_vector_env",
    "normalize_return",
    "register_with_rllib",
]
