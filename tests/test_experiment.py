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


def _run(mean: float, seed: int = 0, std: float = 2.0, episodes: int = 100, acc: float = float("nan"),
         auc: float | None = None):
    ev = {"return_mean": mean, "return_std": std, "episodes": episodes, "return_norm_mean": mean / 10}
    return {"seed": seed, "auc": mean - 1.0 if auc is None else auc, "out": f"finetune-s{seed}", "finetune": {"env_steps": 60_000, "decoder_accuracy": acc},
            "evaluation": {"train_levels": ev, "held_out_levels": ev}, "wall_seconds": 600.0,
            "env_steps_per_s": 125.0}


def _results(latent: list[float], scratch: list[float]) -> dict:
    return {"finetune": {"rl+sl": [_run(m, i) for i, m in enumerate(latent)],
                         "scratch": [_run(m, i) for i, m in enumerate(scratch)]}}


def test_verdict_uses_welch_t_over_seeds_and_says_ahead_only_beyond_the_95_interval():
    # Per-seed areas 5.0, 5.5, 6.0 vs 3.0, 3.5, 4.0: difference 2.0, each side's SE 0.289, SE of the
    # difference 0.408, 4 degrees of freedom, t(0.975, 4) = 2.776: interval 2.0 +- 1.13.
    text = verdict(_results([6.0, 6.5, 7.0], [4.0, 4.5, 5.0]))
    assert "**is ahead of**" in text and "area under the learning curve (mean training return) +2.00" in text
    assert "[+0.87, +3.13]" in text and "Over 60,000 environment steps" in text
    assert "Welch t on 3 vs 3 seeds (4.0 degrees of freedom" in text
    assert "Secondary, the final evaluation: +2.00 raw" in text
    # A larger mean difference with seeds that disagree is not a win: the interval spans zero.
    assert "**cannot be told apart from**" in verdict(_results([3.0, 9.0, 6.5], [4.0, 4.5, 5.0]))
    assert "**is behind**" in verdict(_results([2.0, 2.5, 3.0], [4.0, 4.5, 5.0]))


def test_one_seed_each_proves_nothing_online_but_the_final_evaluation_gets_an_episode_interval():
    text = verdict(_results([5.0], [4.0]))
    assert "**cannot be told apart from**" in text and "[-inf, +inf]" in text and "1 vs 1 runs: undefined" in text
    # SE of each 100-episode mean: 2.0 * sqrt(100/99) / 10 = 0.201; of the difference 0.284; 1.96 of them 0.557.
    assert "final evaluation: +1.00 raw, 95% interval [+0.44, +1.56]" in text and "100 vs 100 episodes" in text


def test_mean_intervals_and_curve_bands_are_student_t():
    import numpy as np

    from lapo_ray.evaluation.stats import curve_band, mean_interval

    m, half = mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), abs=1e-3)
    assert math.isnan(mean_interval([1.0])[1])
    grid = np.array([0.0, 50.0, 100.0, 150.0])
    mean, half = curve_band([[(0, 0.0), (100, 1.0)], [(0, 1.0), (100, 2.0)], [(0, 2.0), (100, 3.0), (150, 3.0)]], grid)
    assert mean[:3].tolist() == [1.0, 1.5, 2.0] and half[1] == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert mean[3] == 3.0 and math.isnan(half[3])  # only one run reaches 150: no extrapolation of the others


def test_online_runs_interleave_variants_seed_by_seed():
    cfg = cpu_experiment()
    assert cfg.game == "coinrun" and cfg.seeds == 3 and cfg.eval.episodes >= 100
    assert cfg.online_runs() == [("rl+sl", 0), ("rl", 0), ("scratch", 0), ("rl+sl", 1), ("scratch", 1),
                                 ("rl+sl", 2), ("scratch", 2)]
    cfg.seeds = 0
    with pytest.raises(ValueError, match="--seeds must be at least 1, got 0"):
        cfg.validate()


def _full_results(run_commit: str = "a" * 40, report_commit: str = "a" * 40) -> dict:
    ev = lambda m: {"return_mean": m, "return_std": 2.0, "episodes": 100, "return_norm_mean": m / 10}  # noqa: E731
    versions = lambda c: {"python": "3.11.7", "ray": "2.60.0", "torch": "2.13.0", "numpy": "1.26.4",  # noqa: E731
                          "lapo_ray_commit": c, "machine": "x86_64", "cpus": "2"}
    return {
        "versions": versions(run_commit), "report_versions": versions(report_commit), "preset": "cpu",
        "demonstrator": {"finetune": {"env_steps": 200_000, "env_steps_per_s": 140.0},
                         "evaluation": {"train_levels": ev(8.0)}, "wall_seconds": 1500.0},
        "random": {"train_levels": ev(2.0), "held_out_levels": ev(2.0), "wall_seconds": 60.0},
        "majority": {"action": 7, "train_levels": ev(2.5), "held_out_levels": ev(2.5), "wall_seconds": 60.0},
        "collect": {"frames": 50_000, "episodes": 300, "frames_per_s": 400.0, "wall_seconds": 125.0},
        "pretrain": {"probe": {"probe_acc": 0.4, "floor_untrained_idm": 0.2, "ceiling_supervised_idm": 0.6,
                               "majority_rate": 0.15, "gap_closed": 0.5, "direct_supervised_classifier": 0.62,
                               "nmi_trained": 0.21, "nmi_untrained": 0.004, "perplexity_trained": [12.3, 11.0],
                               "perplexity_untrained": [1.2, 1.0], "n_train": 8000, "n_val": 2000,
                               "n_test": 10000, "probe_best_epoch": 17, "stage1_steps": 2500},
                     "stage1": {"steps": 2_500}, "wall_seconds": 1200.0},
        "finetune": {"rl+sl": [_run(m, i, acc=0.8) for i, m in enumerate([6.0, 6.5, 7.0])],
                     "rl": [_run(5.0)],
                     "scratch": [_run(m, i) for i, m in enumerate([4.0, 4.5, 5.0])]},
        "decode": {str(k): {"decoder_val_accuracy": 0.3, "agent_val_accuracy": 0.25, "train_levels": ev(3.5),
                            "wall_seconds": 30.0} for k in (16, 256)},
    }


def test_report_states_seeds_budget_versions_the_metric_and_both_verdicts():
    from lapo_ray.evaluation.reports import render_experiment_report

    cfg = cpu_experiment()
    res = _full_results()
    text = render_experiment_report(cfg, res, lambda raw: demo_norm(raw, 2.0, 8.0), {"online": "plots/online.png",
                                                                                    "offline": "plots/offline.png"})
    assert "lapo_ray commit `aaaaaaaaaaaa`; Python 3.11.7, Ray 2.60.0, PyTorch 2.13.0" in text
    assert "report written at" not in text
    assert "Online PPO seeds: 0, 1, 2 for rl+sl (3), rl (1), scratch (3)" in text
    assert "seeded 12345" in text and "held-out levels start at 1,000,000" in text
    assert f"Demonstrator: {cfg.demonstrator.ppo.env_steps:,} PPO steps" in text
    assert f"Corpus: {cfg.collect.frames:,} frames" in text and "(ran 2,500 steps" in text
    # The cpu preset's noise (0.25, held 0.75): 0.25 / (0.25 + 0.25) of the steps, 4-step excursions.
    assert ("collected from the demonstrator on 2 actors at 400 frames/s, with behaviour noise: with probability "
            "0.25 per step a uniform random action is held for 1 / (1 - 0.75) = 4 steps on average instead of "
            "the demonstrator's, 50% of the steps in all. Its actions") in text
    assert "chosen before the run:** area under the learning curve" in text
    # 1500 + 60 + 60 + 125 + 1200 + 7 x 600 + 2 x 30 seconds = 7205 s = 120 min
    assert "Total wall time: **120 min**" in text
    # rl+sl: mean 6.5, t(0.975, 2) x 0.5 / sqrt(3) = 1.24; (6.5 - 2) / 6 = 0.75 of the demonstrator.
    assert "| rl+sl | 3 | 60,000 | 10.0 min | 125 | 5.50 ± 1.24 | 6.50 ± 1.24 | 0.75 | 0.65 |" in text
    assert "| rl | 1 | 60,000 | 10.0 min | 125 | 4.00 | 5.00 | 0.50 |" in text
    assert "| rl+sl | 5.00; 6.00 ± 0.20 | 5.50; 6.50 ± 0.20 | 6.00; 7.00 ± 0.20 |" in text
    assert "**is ahead of**" in text and "Targets missed" not in text
    # Demonstrator 8.0 vs random 2.0, each SE 0.201: 21.1 standard errors; official norm 0.8.
    assert "21.1 standard errors above random" in text and "**met**" in text
    # k = 256: 3.5 vs majority 2.5 over 100 episodes each: +1.00 +- 0.56.
    assert "always action 7" in text and "Decoding from k = 256 labelled frames **is ahead of**" in text
    assert "[+0.44, +1.56]" in text
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


def test_a_missed_target_is_named_with_its_size_and_measured_causes():
    from lapo_ray.evaluation.reports import render_experiment_report

    res = _full_results()
    res["finetune"]["rl+sl"] = [_run(m, i, acc=0.8) for i, m in enumerate([4.2, 4.6, 4.4])]
    res["demonstrator"]["evaluation"]["train_levels"].update(return_mean=3.0, return_norm_mean=0.1)
    res["decode"]["256"]["train_levels"]["return_mean"] = 2.4
    res["pretrain"]["probe"].update(probe_acc=0.2, gap_closed=0.0, stage1_steps=1357)
    res["stage1_final"] = {"train/vq_usage_cb0": 0.98, "train/vq_usage_cb1": 0.97, "train/vq_perplexity_cb0": 13.5,
                           "train/vq_perplexity_cb1": 12.3, "val/wm_loss": 0.0034}
    text = render_experiment_report(cpu_experiment(), res, lambda raw: demo_norm(raw, 2.0, 3.0),
                                    {"online": "o.png", "offline": "f.png"})
    assert "**cannot be told apart from**" in text and "## Targets missed, and the measured causes" in text
    assert "**missed**" in text
    # 3.0 vs 2.0 with SEs of 0.201: 3.5 standard errors.
    assert "3.00 against the random policy's 2.00 (difference +1.00, 3.5 standard errors" in text
    assert "barely better than random" in text
    assert "target 0.50, missed by 0.50" in text
    assert "in 1357 steps of stage 1 the unsupervised IDM did not learn them" in text
    assert "use 98%, 97% of their codes (perplexity 13.5, 12.3)" in text
    assert "Codes in use are no evidence of action information" in text and "collapsed" not in text
    assert "k = 256 the decoded agent minus the majority-action agent: -0.10" in text
    assert "RL + SL minus scratch, area under the curve: -0.10 raw" in text and "RL + SL decoder ends at 0.80" in text


def test_majority_action_counts_each_frame_once(tmp_path):
    import numpy as np

    from lapo_ray.data.corpus import Episode, read_actions, write_corpus
    from lapo_ray.experiment import majority_action

    frames = np.zeros((10, 64, 64, 3), np.uint8)
    eps = [Episode(0, frames, actions=np.array([3] * 6 + [5] * 4)), Episode(1, frames, actions=np.array([5] * 10))]
    write_corpus(str(tmp_path / "c"), eps, game="coinrun", max_segment_frames=4)
    acts = read_actions(str(tmp_path / "c"))
    assert len(acts) == 20 and np.bincount(acts)[3] == 6 and majority_action(str(tmp_path / "c")) == 5


def test_a_gap_within_noise_is_not_read_as_a_share_closed():
    from lapo_ray.evaluation.reports import render_experiment_report

    res = _full_results()
    # The figures of the first CoinRun run: a dominant action, and a ceiling 0.0017 above the floor.
    res["pretrain"]["probe"].update(probe_acc=0.7586, floor_untrained_idm=0.7573, ceiling_supervised_idm=0.7590,
                                    majority_rate=0.7573, gap_closed=0.75, n_test=2349,
                                    info_bits_trained=0.05, info_bits_untrained=0.0, info_bits_supervised=0.04)
    text = render_experiment_report(cpu_experiment(), res, lambda raw: demo_norm(raw, 2.0, 8.0),
                                    {"online": "o.png", "offline": "f.png"})
    assert "gap closed: undefined: the ceiling is above the floor by 0.0017, within two standard errors (0.0250)" in text
    assert "gap closed: 0.75" not in text and "## Targets missed" in text
    assert "not measurable: the ceiling is within two standard errors, 0.025, of the floor" in text
    assert "trained / floor / ceiling | 0.050 / 0.000 / 0.040 |" in text


def test_a_report_only_pass_runs_nothing_and_names_what_is_missing(tmp_path):
    from lapo_ray import storage
    from lapo_ray.evaluation.reports import render_experiment_report
    from lapo_ray.experiment import _step

    out = str(tmp_path)
    storage.write_json(storage.join(out, "steps", "done.json"), {"x": 1})
    missing: list[str] = []
    ran = []
    assert _step(out, "done", lambda: ran.append(1), missing) == {"x": 1}
    assert _step(out, "todo", lambda: ran.append(1), missing) is None
    assert ran == [] and missing == ["todo"]
    # A partial report: one seed of each online variant, no offline decoding yet.
    res = _full_results()
    res["finetune"] = {"rl+sl": [_run(6.0)], "scratch": [_run(4.0)]}
    res["decode"] = {}
    res["missing_steps"] = ["finetune-rl+sl-s1", "decode-k256"]
    text = render_experiment_report(cpu_experiment(), res, lambda raw: demo_norm(raw, 2.0, 8.0), {"online": "o.png"})
    assert "**Partial report.** Steps not run yet: finetune-rl+sl-s1, decode-k256." in text
    assert "![offline]" not in text and "Offline verdict" not in text
    assert "**cannot be told apart from**" in text  # one seed a side proves nothing online
