"""The experiment's wiring and the honesty of its verdict (the full run is `jobs/experiment.py`)."""

from __future__ import annotations

import math

import pytest

from lapo_ray.config.experiment import cpu_experiment
from lapo_ray.experiment import _demo_norm, verdict


def test_resolved_config_threads_game_seed_and_folders_through_every_stage():
    cfg = cpu_experiment()
    cfg.game, cfg.seed, cfg.out = "ninja", 7, "s3://bucket/exp"
    r = cfg.resolved()
    assert r.demonstrator.env.game == r.finetune.env.game == r.collect.game == "ninja"
    assert r.demonstrator.scratch and r.demonstrator.seed == r.finetune.seed == r.collect.seed == 7
    assert r.collect.policy == "agent:s3://bucket/exp/demonstrator"  # the corpus comes from the demonstrator
    assert r.pretrain.corpus == r.collect.out == "s3://bucket/exp/corpus"
    assert r.finetune.pretrain == r.pretrain.out == "s3://bucket/exp/pretrain"
    assert cfg.game == "ninja" and cfg.demonstrator.env.game == "coinrun"  # resolving copies, never mutates


def test_bad_experiment_flags_are_named():
    cfg = cpu_experiment()
    cfg.variants = "rl+sl,bc"
    with pytest.raises(ValueError, match=r"--variants: unknown \['bc'\]"):
        cfg.validate()
    cfg = cpu_experiment()
    cfg.game = "pacman"
    with pytest.raises(ValueError, match="--game 'pacman' is not a Procgen game"):
        cfg.validate()


def test_returns_are_normalised_between_random_and_demonstrator():
    assert _demo_norm(3.0, random_raw=2.0, demo_raw=6.0) == 0.25
    assert _demo_norm(2.0, 2.0, 6.0) == 0.0 and _demo_norm(6.0, 2.0, 6.0) == 1.0
    assert math.isnan(_demo_norm(3.0, 2.0, 2.0))  # a demonstrator no better than random defines no scale


def _results(mean_latent: float, mean_scratch: float, std: float = 2.0, episodes: int = 16):
    ev = lambda m: {"evaluation": {"train_levels": {"return_mean": m, "return_std": std, "episodes": episodes}},  # noqa: E731
                    "finetune": {"env_steps": 75_000}}
    return {"finetune": {"rl+sl": ev(mean_latent), "scratch": ev(mean_scratch)}}


def test_verdict_says_beats_only_beyond_two_standard_errors():
    # Standard error of the difference: hypot(2/4, 2/4) = 0.707; two of them: 1.41.
    assert "**beats**" in verdict({"rl+sl": 0.6, "scratch": 0.2}, _results(6.0, 4.5))
    assert "**is not distinguishable from**" in verdict({"rl+sl": 0.3, "scratch": 0.2}, _results(5.0, 4.5))
    text = verdict({"rl+sl": 0.0, "scratch": 0.5}, _results(3.0, 4.5))
    assert "**does worse than**" in text and "raw difference -1.50" in text and "75,000 environment steps" in text
