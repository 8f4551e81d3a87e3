"""Train/validation splits by episode: ``SplitSpec``, which every source makes (``Source.split``),
the triplet pipeline filters by and ``split.json`` records. It imports nothing of lapo_ray, so the
sources, the mixture of several and the pipeline all build on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Split = Literal["train", "val", "all"]


@dataclass(frozen=True)
class SplitSpec:
    """Assigns whole episodes to train or validation by a seeded hash of the episode id.

    Without ``val_episodes`` an episode is validation when its hash falls below the fraction:
    stable and streaming, but on a handful of episodes it can put all of them on one side (four
    videos once gave validation three). When a scan has listed every episode id,
    ``for_episodes`` fixes the validation side to the ``round(fraction * n)`` episodes of lowest
    hash, at least one and never all, so any corpus of two or more episodes trains and validates.
    """

    val_fraction: float = 0.05
    seed: int = 0
    val_episodes: tuple[int, ...] | None = None

    @classmethod
    def for_episodes(cls, episode_ids, val_fraction: float, seed: int) -> "SplitSpec":
        ids = np.unique(np.asarray(list(episode_ids), dtype=np.int64))
        k = int(round(val_fraction * len(ids)))
        if val_fraction > 0 and len(ids) >= 2:
            k = min(max(k, 1), len(ids) - 1)
        elif len(ids) < 2:
            k = 0  # one episode: it trains; the probe falls back to halves in time
        order = np.argsort(cls(val_fraction, seed).episode_hash(ids), kind="stable")
        return cls(val_fraction, seed, tuple(sorted(int(i) for i in ids[order[:k]])))

    def is_val(self, episode_ids: np.ndarray) -> np.ndarray:
        if self.val_episodes is not None:
            return np.isin(np.asarray(episode_ids, dtype=np.int64), np.asarray(self.val_episodes, dtype=np.int64))
        return (self.episode_hash(episode_ids) % np.uint64(1_000_000)) < np.uint64(round(self.val_fraction * 1_000_000))

    def episode_hash(self, episode_ids: np.ndarray) -> np.ndarray:
        # splitmix64: a fixed, well-mixed hash, so the split is stable across runs and machines.
        with np.errstate(over="ignore"):
            x = np.asarray(episode_ids, dtype=np.uint64) + np.uint64(self.seed) * np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return x ^ (x >> np.uint64(31))

    def keep(self, episode_ids: np.ndarray, split: Split) -> np.ndarray:
        if split == "all":
            return np.ones(len(episode_ids), bool)
        val = self.is_val(episode_ids)
        return val if split == "val" else ~val

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SplitSpec":
        eps = d.get("val_episodes")
        return cls(d["val_fraction"], d["seed"], None if eps is None else tuple(eps))
