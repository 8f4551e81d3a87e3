"""What the experiment claims, as data: each comparison and target with its measure, interval and
outcome. The report renders these; tests and scripts read them, never the report's prose.

The comparison online is judged on a measure fixed before the run (``Measure.AUC``): LAPO's claim
is faster learning, and a final return at a budget long enough to be fair to both arms says
little when PPO from scratch catches up early, while the area under the learning curve counts
every episode of the run. The final evaluation is kept beside it with its own interval.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from lapo_ray.evaluation.probe import gap_closed, gap_two_se
from lapo_ray.evaluation.stats import Difference, episode_difference, sem, welch_difference

# The demonstrator must be clearly better than random to be worth imitating: this many standard
# errors above the random policy, and this much of the official (paper expert = 1) scale.
DEMONSTRATOR_TARGET_SE = 5.0
DEMONSTRATOR_TARGET_NORM = 0.3
# The share of the probe's floor-to-ceiling gap the latent must close.
PROBE_TARGET_GAP = 0.5
# The offline comparison is made at this many labelled frames.
OFFLINE_K = "256"


class Outcome(enum.Enum):
    AHEAD = "ahead"
    BEHIND = "behind"
    LEVEL = "level"  # the 95% interval spans zero
    MET = "met"
    MISSED = "missed"
    UNMEASURABLE = "unmeasurable"  # e.g. a probe gap within noise: no share of it can be read


class Measure(enum.Enum):
    AUC = "auc"
    FINAL_RETURN = "final_return"
    STANDARD_ERRORS_ABOVE_RANDOM = "standard_errors_above_random"
    GAP_CLOSED = "gap_closed"


MEASURE_TEXT = {
    Measure.AUC: ("area under the learning curve: the mean raw training return (RLlib's 20-episode window, "
                  "reported every iteration) over the run's environment steps, trapezoids divided by the span, "
                  "one value per seed, at equal environment steps"),
    Measure.FINAL_RETURN: "the final evaluation's mean raw return on the training levels",
    Measure.STANDARD_ERRORS_ABOVE_RANDOM: "standard errors of the evaluation means above the random policy",
    Measure.GAP_CLOSED: "share of the probe's floor-to-ceiling gap closed",
}


@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b`` on ``measure``, with its 95% interval."""

    a: str
    b: str
    measure: Measure
    difference: Difference

    @property
    def outcome(self) -> Outcome:
        d = self.difference
        return Outcome.AHEAD if d.low > 0 else Outcome.BEHIND if d.high < 0 else Outcome.LEVEL


@dataclass(frozen=True)
class Target:
    """A figure against the level it must reach; ``value`` None where it cannot be measured."""

    name: str
    measure: Measure
    value: float | None
    target: float
    extra_ok: bool = True  # a second condition the target also needs (the demonstrator's official scale)

    @property
    def outcome(self) -> Outcome:
        if self.value is None:
            return Outcome.UNMEASURABLE
        return Outcome.MET if self.value >= self.target and self.extra_ok else Outcome.MISSED


@dataclass(frozen=True)
class Claims:
    demonstrator: Target
    probe: Target | None
    online: Comparison | None  # rl+sl vs scratch, on the AUC
    online_final: Comparison | None  # the same runs' final evaluations
    offline: Comparison | None  # the k = 256 decoded agent vs the majority-action agent

    @property
    def all_met(self) -> bool:
        return (self.demonstrator.outcome is Outcome.MET
                and self.probe is not None and self.probe.outcome is Outcome.MET
                and self.online is not None and self.online.outcome is Outcome.AHEAD
                and self.offline is not None and self.offline.outcome is Outcome.AHEAD)


def train_levels(r: dict[str, Any]) -> dict[str, Any]:
    """An evaluation on the training levels, from a step result of either shape."""
    return r["train_levels"] if "train_levels" in r else r["evaluation"]["train_levels"]


def standard_errors_apart(a: dict[str, Any], b: dict[str, Any]) -> float:
    return (a["return_mean"] - b["return_mean"]) / max(float(np.hypot(sem(a), sem(b))), 1e-9)


def resolved_gap_closed(p: dict[str, Any]) -> tuple[float | None, float]:
    """(share of the probe's gap closed, two standard errors of the gap); None where the gap is
    within noise or a figure is missing."""
    floor, ceiling = p.get("floor_untrained_idm"), p.get("ceiling_supervised_idm")
    if floor is None or ceiling is None or p.get("probe_acc") is None:
        return p.get("gap_closed"), float("nan")
    n = int(p.get("n_test") or 0) or None
    two_se = p.get("gap_two_se", gap_two_se(floor, n) if n else float("nan"))
    return gap_closed(p["probe_acc"], floor, ceiling, n), two_se


def demonstrator_target(results: dict[str, Any]) -> Target:
    demo, rand = train_levels(results["demonstrator"]), train_levels(results["random"])
    return Target("demonstrator", Measure.STANDARD_ERRORS_ABOVE_RANDOM, standard_errors_apart(demo, rand),
                  DEMONSTRATOR_TARGET_SE, extra_ok=demo["return_norm_mean"] >= DEMONSTRATOR_TARGET_NORM)


def probe_target(probe: dict[str, Any]) -> Target | None:
    if not probe:
        return None
    return Target("probe", Measure.GAP_CLOSED, resolved_gap_closed(probe)[0], PROBE_TARGET_GAP)


def online_comparison(results: dict[str, Any]) -> Comparison | None:
    """RL + SL minus scratch on the area under the curve, Welch's interval over seeds (unbounded
    with one seed a side: a single run per arm proves nothing)."""
    online = results["finetune"]
    if not online.get("rl+sl") or not online.get("scratch"):
        return None
    d = welch_difference([r["auc"] for r in online["rl+sl"]], [r["auc"] for r in online["scratch"]])
    return Comparison("rl+sl", "scratch", Measure.AUC, d)


def online_final_comparison(results: dict[str, Any]) -> Comparison | None:
    """The final evaluations' mean returns, Welch's t over seeds; with one seed a side, a normal
    interval over the two evaluations' episodes."""
    online = results["finetune"]
    if not online.get("rl+sl") or not online.get("scratch"):
        return None
    a = [train_levels(r) for r in online["rl+sl"]]
    b = [train_levels(r) for r in online["scratch"]]
    d = (episode_difference(a[0], b[0]) if len(a) == 1 and len(b) == 1 else
         welch_difference([e["return_mean"] for e in a], [e["return_mean"] for e in b]))
    return Comparison("rl+sl", "scratch", Measure.FINAL_RETURN, d)


def offline_comparison(results: dict[str, Any]) -> Comparison | None:
    dec, maj = results.get("decode") or {}, results.get("majority")
    if OFFLINE_K not in dec or not maj:
        return None
    d = episode_difference(dec[OFFLINE_K]["train_levels"], train_levels(maj))
    return Comparison(f"offline k={OFFLINE_K}", "majority action", Measure.FINAL_RETURN, d)


def judge(results: dict[str, Any]) -> Claims:
    """Every claim of an experiment's ``results`` (as ``jobs/experiment.py`` gathers them)."""
    return Claims(demonstrator=demonstrator_target(results),
                  probe=probe_target(results.get("pretrain", {}).get("probe") or {}),
                  online=online_comparison(results), online_final=online_final_comparison(results),
                  offline=offline_comparison(results))
