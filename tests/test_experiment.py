"""The experiment's wiring and the honesty of its verdict (the full run is `jobs/experiment.py`)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from test_jobs import _job

from lapo_ray.config.cli import get_path
from lapo_ray.config.experiment import SET_BY_EXPERIMENT, cpu_experiment
from lapo_ray.evaluation.claims import Measure, Outcome, judge, online_comparison, online_final_comparison
from lapo_ray.evaluation.experiment_report import diagnosis, render_experiment_report
from lapo_ray.evaluation.reports import demo_norm


def test_resolved_config_threads_game_seed_and_folders_through_every_stage():
    cfg = cpu_experiment()
    cfg.game, cfg.seed, cfg.out = "ninja", 7, "s3://bucket/exp"
    r = cfg.resolved()
    assert r.demonstrator.env.game == r.finetune.env.game == r.collect.game == "ninja"
    assert r.demonstrator.scratch and r.demonstrator.seed == r.finetune.seed == r.collect.seed == 7
    assert r.collect.policy == "agent:s3://bucket/exp/demonstrator"  # the corpus comes from the demonstrator
    assert r.pretrain.corpus == r.collect.out == "s3://bucket/exp/corpus"
    assert r.finetune.pretrain == r.pretrain.out == "s3://bucket/exp/pretrain"
    assert r.pretrain.collect == r.collect  # the pretraining's record names the collection of its corpus
    assert r.eval.seed == 7 + 12345
    assert cfg.game == "ninja" and cfg.demonstrator.env.game == "coinrun"  # resolving copies, never mutates


def _leaves(config, prefix=""):
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        yield from _leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [f"{prefix}{f.name}"]


def test_every_field_the_experiment_sets_is_named_with_what_sets_it():
    cfg = cpu_experiment()
    cfg.game, cfg.seed, cfg.out = "ninja", 7, "s3://bucket/exp"
    r = cfg.resolved()
    moved = {p for p in _leaves(cfg) if get_path(r, p) != get_path(cfg, p) and not p.startswith("pretrain.collect.")}
    assert moved and moved <= set(SET_BY_EXPERIMENT), moved - set(SET_BY_EXPERIMENT)
    assert all(get_path(cfg, p) is not None for p in SET_BY_EXPERIMENT)  # each entry names a field


def test_a_flag_the_experiment_sets_is_refused_in_one_line_naming_it(capsys):
    job = _job("experiment")
    refused = {
        "--pretrain.collect.frames": "is set by the experiment (--collect.frames); give --collect.frames instead",
        "--collect.out": "is set by the experiment (--out); give --out instead",
        "--finetune.ppo.decoder-sl": "is set by the experiment (--variants); give --variants instead",
        "--decoder.k": "is set by the experiment (--decode-k); give --decode-k instead",
    }
    for flag, message in refused.items():
        with pytest.raises(SystemExit) as exit_:
            job.parse_args([flag, "false" if flag.endswith("sl") else "10"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].endswith(f": error: {flag} {message}"), err
    # The value the experiment sets is no conflict; the experiment's own flags reach every stage.
    cfg, _ = job.parse_args(["--pretrain.collect.frames", "1000", "--collect.frames", "1000", "--seed", "1",
                             "--eval.seed", "12346"])
    assert cfg.resolved().pretrain.collect.frames == 1000 and cfg.resolved().eval.seed == 12346


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


def test_online_claim_is_welch_t_over_seeds_on_the_auc_and_ahead_only_beyond_the_95_interval():
    # Per-seed areas 5.0, 5.5, 6.0 vs 3.0, 3.5, 4.0: difference 2.0, each side's SE 0.289, SE of the
    # difference 0.408, 4 degrees of freedom, t(0.975, 4) = 2.776: interval 2.0 +- 1.13.
    c = online_comparison(_results([6.0, 6.5, 7.0], [4.0, 4.5, 5.0]))
    assert (c.a, c.b, c.measure, c.outcome) == ("rl+sl", "scratch", Measure.AUC, Outcome.AHEAD)
    assert c.difference.diff == pytest.approx(2.0)
    assert (c.difference.low, c.difference.high) == pytest.approx((2.0 - 1.1334, 2.0 + 1.1334), abs=1e-3)
    assert "Welch t on 3 vs 3 seeds (4.0 degrees of freedom" in c.difference.test
    final = online_final_comparison(_results([6.0, 6.5, 7.0], [4.0, 4.5, 5.0]))
    assert final.measure is Measure.FINAL_RETURN and final.difference.diff == pytest.approx(2.0)
    # A larger mean difference with seeds that disagree is not a win: the interval spans zero.
    assert online_comparison(_results([3.0, 9.0, 6.5], [4.0, 4.5, 5.0])).outcome is Outcome.LEVEL
    assert online_comparison(_results([2.0, 2.5, 3.0], [4.0, 4.5, 5.0])).outcome is Outcome.BEHIND
    assert online_comparison({"finetune": {"rl+sl": [_run(5.0)]}}) is None


def test_one_seed_each_proves_nothing_online_but_the_final_evaluation_gets_an_episode_interval():
    c = online_comparison(_results([5.0], [4.0]))
    assert c.outcome is Outcome.LEVEL and (c.difference.low, c.difference.high) == (-math.inf, math.inf)
    # SE of each 100-episode mean: 2.0 * sqrt(100/99) / 10 = 0.201; of the difference 0.284; 1.96 of them 0.557.
    final = online_final_comparison(_results([5.0], [4.0]))
    assert final.outcome is Outcome.AHEAD and "100 vs 100 episodes" in final.difference.test
    assert (final.difference.low, final.difference.high) == pytest.approx((1.0 - 0.5572, 1.0 + 0.5572), abs=1e-3)


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


def test_claims_of_a_run_that_met_every_target():
    claims = judge(_full_results())
    # Demonstrator 8.0 vs random 2.0, each SE 0.201: 21.1 standard errors; official norm 0.8.
    assert claims.demonstrator.outcome is Outcome.MET and claims.demonstrator.value == pytest.approx(21.1, abs=0.05)
    assert claims.probe.measure is Measure.GAP_CLOSED and claims.probe.value == pytest.approx(0.5)
    assert claims.online.outcome is Outcome.AHEAD and claims.online.measure is Measure.AUC
    # k = 256: 3.5 vs majority 2.5 over 100 episodes each: +1.00 +- 0.56.
    off = claims.offline
    assert off.outcome is Outcome.AHEAD and off.measure is Measure.FINAL_RETURN and off.b == "majority action"
    assert (off.difference.low, off.difference.high) == pytest.approx((0.443, 1.557), abs=1e-3)
    assert claims.all_met


def test_report_states_seeds_budget_versions_and_the_figures_of_every_table():
    cfg = cpu_experiment()
    text = render_experiment_report(cfg, _full_results(), lambda raw: demo_norm(raw, 2.0, 8.0),
                                    {"online": "plots/online.png", "offline": "plots/offline.png"})
    assert "`aaaaaaaaaaaa`; Python 3.11.7, Ray 2.60.0, PyTorch 2.13.0" in text and "report written at" not in text
    assert "0, 1, 2 for rl+sl (3), rl (1), scratch (3)" in text
    assert "seeded 12345" in text and "1,000,000" in text
    assert f"{cfg.demonstrator.ppo.env_steps:,} PPO steps" in text and f"{cfg.collect.frames:,} frames" in text
    assert "(ran 2,500 steps" in text
    # The cpu preset's noise (0.25, held 0.75): 0.25 / (0.25 + 0.25) of the steps, 4-step excursions.
    assert "1 / (1 - 0.75) = 4 steps" in text and "50% of the steps" in text
    # 1500 + 60 + 60 + 125 + 1200 + 7 x 600 + 2 x 30 seconds = 7205 s = 120 min
    assert "**120 min**" in text
    # rl+sl: mean 6.5, t(0.975, 2) x 0.5 / sqrt(3) = 1.24; (6.5 - 2) / 6 = 0.75 of the demonstrator.
    assert "| rl+sl | 3 | 60,000 | 10.0 min | 125 | 5.50 ± 1.24 | 6.50 ± 1.24 | 0.75 | 0.65 |" in text
    assert "| rl | 1 | 60,000 | 10.0 min | 125 | 4.00 | 5.00 | 0.50 |" in text
    assert "| rl+sl | 5.00; 6.00 ± 0.20 | 5.50; 6.50 ± 0.20 | 6.00; 7.00 ± 0.20 |" in text
    assert "21.1 standard errors" in text and "[+0.44, +1.56]" in text
    assert "## Targets missed" not in text
    assert "always action 7 (RIGHT)" in text  # the majority agent's action, by its Procgen name
    # Every probe figure, each in its own row: the ceiling is a probe, the classifier is not.
    for row in ("| trained IDM (no labels) | 0.400 |", "| floor: untrained IDM | 0.200 |",
                "| majority action | 0.150 |", "| 0.210 | 0.004 |", "| 12.3, 11.0 | 1.2, 1.0 |"):
        assert row in text
    assert "IDM trained on the true actions | 0.600 |" in text and "own action head; not a probe) | 0.620 |" in text
    assert "gap closed: 0.50" in text and "best validation epoch 17" in text
    resumed = render_experiment_report(cfg, _full_results(report_commit="b" * 40), lambda raw: raw,
                                       {"online": "o.png", "offline": "f.png"})
    assert "`bbbbbbbbbbbb`" in resumed


def _missed_results() -> dict:
    res = _full_results()
    res["finetune"]["rl+sl"] = [_run(m, i, acc=0.8) for i, m in enumerate([4.2, 4.6, 4.4])]
    res["demonstrator"]["evaluation"]["train_levels"].update(return_mean=3.0, return_norm_mean=0.1)
    res["decode"]["256"]["train_levels"]["return_mean"] = 2.4
    res["pretrain"]["probe"].update(probe_acc=0.2, gap_closed=0.0, stage1_steps=1357)
    res["stage1_final"] = {"train/vq_usage_cb0": 0.98, "train/vq_usage_cb1": 0.97, "train/vq_perplexity_cb0": 13.5,
                           "train/vq_perplexity_cb1": 12.3, "val/wm_loss": 0.0034}
    return res


def test_a_missed_target_is_named_with_its_size_and_measured_causes():
    res = _missed_results()
    claims = judge(res)
    assert claims.online.outcome is Outcome.LEVEL and not claims.all_met
    # 3.0 vs 2.0 with SEs of 0.201: 3.5 standard errors.
    assert claims.demonstrator.outcome is Outcome.MISSED and claims.demonstrator.value == pytest.approx(3.52, abs=0.01)
    assert claims.probe.outcome is Outcome.MISSED and claims.probe.value == pytest.approx(0.0)
    assert claims.offline.difference.diff == pytest.approx(-0.1)
    causes = diagnosis(res, "coinrun")
    assert [c.split("**")[1] for c in causes] == ["Demonstrator.", "Latent actions.", "Codebook.", "Online.",
                                                  "Decoders."]
    demo, latent, codebook, online, decoders = causes
    assert "3.00" in demo and "2.00" in demo and "+1.00" in demo and "3.5 standard errors" in demo
    assert "missed by 0.50" in latent and "1357 steps" in latent
    assert "98%, 97%" in codebook and "13.5, 12.3" in codebook and "no evidence of action information" in codebook
    assert "-0.10" in online and "-0.10" in decoders and "0.80" in decoders
    text = render_experiment_report(cpu_experiment(), res, lambda raw: demo_norm(raw, 2.0, 3.0),
                                    {"online": "o.png", "offline": "f.png"})
    assert "## Targets missed, and the measured causes" in text and all(c in text for c in causes)


def test_diagnosis_speaks_of_the_game_and_action_that_were_measured():
    res = _full_results()
    # A maze corpus where NOOP dominates and the ceiling is within noise of the floor.
    res["majority"]["action"] = 4
    res["pretrain"]["probe"].update(probe_acc=0.61, floor_untrained_idm=0.60, ceiling_supervised_idm=0.605,
                                    majority_rate=0.60, n_test=4000)
    latent = diagnosis(res, "maze")[1]
    assert "maze corpus" in latent and "(NOOP)" in latent and "0.600" in latent
    assert "not measurable" in latent
    assert "coinrun" not in latent.lower() and "mid-air" not in latent


def test_majority_action_counts_each_frame_once(tmp_path):
    import numpy as np

    from lapo_ray.data.corpus import Episode, read_actions, write_corpus
    from lapo_ray.pipelines.experiment import majority_action

    frames = np.zeros((10, 64, 64, 3), np.uint8)
    eps = [Episode(0, frames, actions=np.array([3] * 6 + [5] * 4)), Episode(1, frames, actions=np.array([5] * 10))]
    write_corpus(str(tmp_path / "c"), eps, game="coinrun", max_segment_frames=4)
    acts = read_actions(str(tmp_path / "c"))
    assert len(acts) == 20 and np.bincount(acts)[3] == 6 and majority_action(str(tmp_path / "c")) == 5


def test_a_gap_within_noise_is_not_read_as_a_share_closed():
    res = _full_results()
    # The figures of the first CoinRun run: a dominant action, and a ceiling 0.0017 above the floor.
    res["pretrain"]["probe"].update(probe_acc=0.7586, floor_untrained_idm=0.7573, ceiling_supervised_idm=0.7590,
                                    majority_rate=0.7573, gap_closed=0.75, n_test=2349,
                                    info_bits_trained=0.05, info_bits_untrained=0.0, info_bits_supervised=0.04)
    text = render_experiment_report(cpu_experiment(), res, lambda raw: demo_norm(raw, 2.0, 8.0),
                                    {"online": "o.png", "offline": "f.png"})
    probe = judge(res).probe
    assert probe.outcome is Outcome.UNMEASURABLE and probe.value is None
    assert "gap closed: undefined" in text and "0.0017" in text and "(0.0250)" in text
    assert "gap closed: 0.75" not in text and "## Targets missed" in text
    assert "trained / floor / ceiling | 0.050 / 0.000 / 0.040 |" in text


def test_a_report_only_pass_runs_nothing_and_names_what_is_missing(tmp_path):
    from lapo_ray import storage
    from lapo_ray.pipelines.experiment import _step

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
    assert "finetune-rl+sl-s1, decode-k256" in text and "![offline]" not in text
    claims = judge(res)
    assert claims.offline is None and claims.online.outcome is Outcome.LEVEL  # one seed a side proves nothing


def test_report_only_rebuilds_the_report_from_step_markers_without_running_a_step(tmp_path):
    from lapo_ray import storage
    from lapo_ray.pipelines.experiment import run_experiment

    cfg = cpu_experiment()
    cfg.out, cfg.report_only = str(tmp_path), True
    res = _full_results()
    for name in ("random", "collect", "pretrain"):
        storage.write_json(storage.join(cfg.out, "steps", f"{name}.json"), res[name])
    with pytest.raises(ValueError, match=r"nothing to report yet: step\(s\) demonstrator not finished"):
        run_experiment(cfg)
    storage.write_json(storage.join(cfg.out, "steps", "demonstrator.json"), res["demonstrator"])
    results = run_experiment(cfg)
    assert results["missing_steps"] == ["majority"] + [f"finetune-{v}-s{s}" for v, s in cfg.online_runs()] + [
        f"decode-k{k}" for k in cfg.decode_k]
    assert results["finetune"] == {} and results["decode"] == {}
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# LAPO on coinrun") and "| trained IDM (no labels) | 0.400 |" in report
    assert storage.read_json(storage.join(cfg.out, "results.json"))["collect"]["frames"] == 50_000
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == [
        "collect.json", "demonstrator.json", "pretrain.json", "random.json", "versions.json"]
