"""The statistics the experiment's claims rest on: intervals across seeds and across episodes.

Seeds are the unit of replication for training (each seed is a whole PPO run), so a comparison of
two training methods uses the per-seed means, with Student's t on few seeds. Episodes are the
unit for comparing two fixed agents (offline decoders, the majority-action agent, the
demonstrator against random), where the mean of N episodes has standard error std / sqrt(N).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Difference:
    """``a - b`` with its two-sided 95% interval and the test behind it."""

    diff: float
    low: float
    high: float
    test: str


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the t interval of ``values``; a half-width of NaN for one value."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """Welch's t interval for mean(a) - mean(b) over independent runs (e.g. seeds).

    With one run per side there are no degrees of freedom: the interval is unbounded, which is
    the honest answer (use ``episode_difference`` to compare two single agents)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return Difference(diff, -math.inf, math.inf, f"Welch t on {len(x)} vs {len(y)} runs: undefined")
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Difference(diff, diff, diff, f"Welch t on {len(x)} vs {len(y)} runs (no spread)")
    dof = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    half = stats.t.ppf(0.5 + level / 2, dof) * se
    return Difference(diff, diff - half, diff + half,
                      f"Welch t on {len(x)} vs {len(y)} seeds ({dof:.1f} degrees of freedom, "
                      f"{level:.0%} interval)")


def episode_difference(a: dict[str, Any], b: dict[str, Any], level: float = 0.95) -> Difference:
    """Normal interval for the difference of two evaluations' mean returns (episodes as samples)."""
    se = math.hypot(sem(a), sem(b))
    diff = a["return_mean"] - b["return_mean"]
    z = stats.norm.ppf(0.5 + level / 2)
    return Difference(diff, diff - z * se, diff + z * se,
                      f"normal interval on {a['episodes']} vs {b['episodes']} episodes ({level:.0%})")


def sem(evaluation: dict[str, Any]) -> float:
    """Standard error of an evaluation's mean return (``return_std`` is the population std)."""
    n = max(int(evaluation["episodes"]), 2)
    return float(evaluation["return_std"]) * math.sqrt(n / (n - 1)) / math.sqrt(n)


def curve_band(curves: Sequence[Sequence[tuple[float, float]]], grid: np.ndarray,
               level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Mean and t half-width across runs of curves ``[(x, y), ...]``, each interpolated on ``grid``
    (points of the grid beyond a run's last x are left out of that run: no extrapolation)."""
    rows = []
    for pts in curves:
        xs, ys = (np.asarray(v, dtype=float) for v in zip(*pts)) if pts else (np.array([]), np.array([]))
        row = np.full(len(grid), np.nan)
        if len(xs):
            inside = (grid >= xs[0]) & (grid <= xs[-1])
            row[inside] = np.interp(grid[inside], xs, ys)
        rows.append(row)
    m = np.array(rows)
    mean = np.full(len(grid), np.nan)
    half = np.full(len(grid), np.nan)
    for j in range(len(grid)):
        col = m[:, j][~np.isnan(m[:, j])]
        if len(col):
            mean[j], half[j] = mean_interval(col, level)
    return mean, half


def curve_mean(points: Sequence[tuple[float, float]]) -> float:
    """Area under a curve ``[(x, y), ...]`` divided by its x span (trapezoids): the mean height
    over the run, so runs of equal length compare as areas under their curves."""
    if not points:
        return float("nan")
    xs, ys = (np.asarray(v, dtype=float) for v in zip(*points))
    if len(xs) == 1 or xs[-1] == xs[0]:
        return float(ys.mean())
    return float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)) / (xs[-1] - xs[0]))
