"""Procgen return normalisation used by LAPO: uniform-random policy = 0, expert policy = 1.

The reference returns are the mean episodic returns on Procgen ``distribution_mode="easy"`` that
the official LAPO code hard-codes: ``urp_ep_return`` (uniform random policy) and
``expert_ep_return`` (the PPO experts that produced the LAPO data set) in ``lapo/env_utils.py`` of
https://github.com/schmidtdominik/LAPO (commit c3844f7e8c92e900bf7547a265f14089ac68b121). Its
``normalize_return`` maps a return ``v`` to ``(v - random) / (expert - random)`` (via
``doy.normalize_into_range``); so does :func:`normalize_return` here, without clipping.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, overload

import numpy as np
import numpy.typing as npt

__all__ = ["RANDOM_RETURNS", "EXPERT_RETURNS", "normalize_return"]

RANDOM_RETURNS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "bigfish": 0.8742888,
        "bossfight": 0.04618272,
        "caveflyer": 2.5970738,
        "chaser": 0.6632482,
        "climber": 2.2242901,
        "coinrun": 2.704834,
        "dodgeball": 0.612983,
        "fruitbot": -2.5330205,
        "heist": 3.0758767,
        "jumper": 3.4105318,
        "leaper": 2.5105245,
        "maze": 4.2726293,
        "miner": 1.2513667,
        "ninja": 2.5599792,
        "plunder": 4.3207445,
        "starpilot": 1.5251881,
    }
)

EXPERT_RETURNS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "bigfish": 36.336166,
        "bossfight": 11.634365,
        "caveflyer": 9.183605,
        "chaser": 9.955711,
        "climber": 10.233627,
        "coinrun": 9.93251,
        "dodgeball": 13.486584,
        "fruitbot": 29.925259,
        "heist": 9.685265,
        "jumper": 8.460201,
        "leaper": 7.4082565,
        "maze": 9.969294,
        "miner": 11.892558,
        "ninja": 9.474582,
        "plunder": 11.460528,
        "starpilot": 66.98625,
    }
)

@overload
def normalize_return(game: str, raw: float) -> float: ...
@overload
def normalize_return(game: str, raw: npt.ArrayLike) -> np.ndarray: ...


def normalize_return(game: str, raw: float | npt.ArrayLike) -> float | np.ndarray:
    """Map raw episodic return(s) of ``game`` so the random policy scores 0 and the expert 1.

    Python scalars give a ``float``; arrays and sequences give a float64 ``np.ndarray`` of the
    same shape. Values are not clipped: a policy better than the expert scores above 1.

    Raises:
        ValueError: ``game`` is not one of the 16 Procgen games.
    """
    if game not in RANDOM_RETURNS:
        raise ValueError(
            f"No reference returns for game {game!r}; known games: {', '.join(RANDOM_RETURNS)}"
        )
    low, high = RANDOM_RETURNS[game], EXPERT_RETURNS[game]
    normalized = (np.asarray(raw, dtype=np.float64) - low) / (high - low)
    if np.ndim(raw) == 0 and not isinstance(raw, np.ndarray):
        return float(normalized)
    return normalized
