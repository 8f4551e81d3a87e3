"""The experiment's wiring and the honesty of its verdict (the full run is `jobs/experiment.py`)."""

from __future__ import annotations

import math

import pytest

from lapo_ray.config.experiment import cpu_experiment
from lapo_ray.evaluation.reports import demo_norm, verdict


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
    assert demo_norm(3.0, random_raw=2.0, demo_raw=6.0) == 0.25
    assert demo_norm(2.0, 2.0, 6.0) == 0.0 and demo_norm(6.0, 2.0, 6.0) == 1.0
    assert math.isnan(demo_norm(3.0, 2.0, 2.0))  # a demonstrator no better than random defines no scale


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


def _full_results(run_commit: str = "a" * 40, report_commit: str = "a" * 40) -> dict:
    ev = lambda m: {"return_mean": m, "return_std": 2.0, "episodes": 16, "return_norm_mean": m / 10}  # noqa: E731
    versions = lambda c: {"python": "3.11.7", "ray": "2.60.0", "torch": "2.13.0", "numpy": "1.26.4",  # noqa: E731
                          "lapo_ray_commit": c, "machine": "x86_64", "cpus": "2"}
    online = lambda m, acc: {"finetune": {"env_steps": 75_000, "decoder_accuracy": acc},  # noqa: E731
                             "evaluation": {"train_levels": ev(m), "held_out_levels": ev(m)},
                             "wall_seconds": 600.0, "env_steps_per_s": 125.0}
    return {
        "versions": versions(run_commit), "report_versions": versions(report_commit), "preset": "cpu",
        "demonstrator": {"finetune": {"env_steps": 200_000, "env_steps_per_s": 140.0},
                         "evaluation": {"train_levels": ev(8.0)}, "wall_seconds": 1500.0},
        "random": {"train_levels": ev(2.0), "wall_seconds": 60.0},
        "collect": {"frames": 50_000, "episodes": 300, "frames_per_s": 400.0, "wall_seconds": 125.0},
        "pretrain": {"probe": {"probe_acc": 0.4, "floor_untrained_idm": 0.2, "ceiling_supervised_idm": 0.6,
                               "majority_rate": 0.15, "gap_closed": 0.5, "direct_supervised_classifier": 0.62,
                               "nmi_trained": 0.21, "nmi_untrained": 0.004, "perplexity_trained": [12.3, 11.0],
                               "perplexity_untrained": [1.2, 1.0], "n_train": 8000, "n_val": 2000,
                               "n_test": 10000, "probe_best_epoch": 17, "stage1_steps": 2500},
                     "stage1": {"steps": 2_500}, "wall_seconds": 1200.0},
        "finetune": {"rl+sl": online(6.5, 0.8), "rl": online(5.0, float("nan")), "scratch": online(4.0, float("nan"))},
        "decode": {str(k): {"decoder_val_accuracy": 0.3, "agent_val_accuracy": 0.25, "train_levels": ev(3.0),
                            "wall_seconds": 30.0} for k in (16, 4096)},
    }


def test_report_states_seeds_budget_versions_and_the_verdict():
    from lapo_ray.evaluation.reports import render_experiment_report

    cfg = cpu_experiment()
    res = _full_results()
    text = render_experiment_report(cfg, res, lambda raw: demo_norm(raw, 2.0, 8.0), {"online": "plots/online.png",
                                                                            "offline": "plots/offline.png"})
    assert "lapo_ray commit `aaaaaaaaaaaa`; Python 3.11.7, Ray 2.60.0, PyTorch 2.13.0" in text
    assert "report written at" not in text
    assert "Experiment seed 0" in text and "seeded 12345" in text and "held-out levels start at 1,000,000" in text
    assert "Demonstrator: 200,000 PPO steps" in text and "Corpus: 50,000 frames" in text
    assert "12 min (ran 2,500 steps" in text and "75,000 env steps per variant" in text
    # 1500 + 60 + 125 + 1200 + 3 x 600 + 2 x 30 seconds = 4745 s = 79 min
    assert "Total wall time: **79 min**" in text
    assert "| rl+sl | 75,000 | 10.0 min | 125 | 6.50 ± 0.50 | 0.75 |" in text
    assert "**beats**" in text  # 6.5 vs 4.0 with two standard errors of 1.41
    # Every probe figure, each under its own name: the ceiling is a probe, the classifier is not.
    assert "| trained IDM (no labels) | 0.400 |" in text and "| floor: untrained IDM | 0.200 |" in text
    assert "| ceiling: same probe on an IDM trained on the true actions | 0.600 |" in text
    assert "| direct supervised classifier (that IDM's own action head; not a probe) | 0.620 |" in text
    assert "gap closed: 0.50" in text and "| majority action | 0.150 |" in text
    assert "| 0.210 | 0.004 |" in text and "| 12.3, 11.0 | 1.2, 1.0 |" in text
    assert "says nothing about the action" in text and "best validation epoch 17" in text
    resumed = render_experiment_report(cfg, _full_results(report_commit="b" * 40), lambda raw: raw,
                            {"online": "o.png", "offline": "f.png"})
    assert "(report written at `bbbbbbbbbbbb`)" in resumed


def test_a_lost_comparison_names_its_measured_causes():
    from lapo_ray.evaluation.reports import render_experiment_report

    res = _full_results()
    res["finetune"]["rl+sl"]["evaluation"]["train_levels"]["return_mean"] = 4.2  # within noise of scratch
    res["demonstrator"]["evaluation"]["train_levels"]["return_mean"] = 3.0  # 1.0 above random: 1.4 SE
    res["pretrain"]["probe"].update(probe_acc=0.2, gap_closed=0.0, stage1_steps=1357)
    res["stage1_final"] = {"train/vq_usage_cb0": 0.98, "train/vq_usage_cb1": 0.97, "train/vq_perplexity_cb0": 13.5,
                           "train/vq_perplexity_cb1": 12.3, "val/wm_loss": 0.0034}
    text = render_experiment_report(cpu_experiment(), res, lambda raw: demo_norm(raw, 2.0, 3.0),
                         {"online": "o.png", "offline": "f.png"})
    assert "**is not distinguishable from**" in text and "### Why not" in text
    assert "3.00 against the random policy's 2.00 (difference +1.00, 1.4 standard errors)" in text
    assert "barely better than random" in text
    assert "in 1357 steps of stage 1 the unsupervised IDM did not learn them" in text
    assert "use 98%, 97% of their codes (perplexity 13.5, 12.3)" in text
    assert "Codes in use are no evidence of action information" in text and "collapsed" not in text
    assert "k = 4,096 labelled frames" in text and "RL + SL decoder ends at 0.80" in text
    assert "### Why not" not in render_experiment_report(cpu_experiment(), _full_results(), lambda raw: raw,
                                              {"online": "o.png", "offline": "f.png"})
