"""Recipe sweeps on Ray Tune: the grid and its trials, the shared ceiling's key, the table's
statistics, and a sweep killed halfway that resumes without rerunning its finished trial."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lapo_ray.config import PretrainConfig
from lapo_ray.config.sweep import SWEEP_PRESETS, SweepConfig, config_name
from lapo_ray.pipelines.sweep import (
    NOT_READ_BY_CEILING,
    Trial,
    ceiling_folder,
    ceiling_key,
    render_table,
    summarise,
    trial_config,
)
from test_jobs import library_lines, load_script

REPO = Path(__file__).resolve().parents[1]


def _parse(argv):
    return load_script("jobs/sweep.py").parse_args(argv)[0]


def test_the_grid_gives_every_combination_in_order_and_random_search_a_fixed_draw():
    cfg = _parse(["--pretrain.corpus", "c", "--grid", "stage1.augment=none,shift",
                  "--grid", "model.vq.enabled=true,false", "--seeds", "2"])
    assert cfg.configurations() == [
        {"stage1.augment": "none", "model.vq.enabled": "true"}, {"stage1.augment": "none", "model.vq.enabled": "false"},
        {"stage1.augment": "shift", "model.vq.enabled": "true"}, {"stage1.augment": "shift", "model.vq.enabled": "false"}]
    draw = dataclasses.replace(cfg, search="random", samples=2)
    assert len(draw.configurations()) == 2 and draw.configurations() == draw.configurations()
    assert set(map(str, draw.configurations())) <= set(map(str, cfg.configurations()))
    assert SweepConfig(pretrain=cfg.pretrain).configurations() == [{}]
    assert config_name({}) == "baseline"
    # The corpus's last folder and a hash of its whole path (sha1 of "/data/recipes/ninja").
    assert (config_name({"corpus": "/data/recipes/ninja/", "stage1.augment": "shift"})
            == "corpus=ninja-8aef2f,augment=shift")


def test_two_corpora_of_one_name_get_trial_folders_of_their_own(tmp_path):
    names = [config_name({"corpus": c}) for c in ("data/a/coinrun", "data/b/coinrun")]
    assert names[0] != names[1] and all(re.fullmatch(r"corpus=coinrun-[0-9a-f]{6}", n) for n in names), names
    assert config_name({"corpus": "data/a/coinrun/"}) == names[0]  # a trailing slash names the same folder
    base = SWEEP_PRESETS["cpu"]().pretrain
    base.corpus = "c"
    outs = [trial_config(base, Trial({"corpus": c}, 0), str(tmp_path)).out
            for c in ("data/a/coinrun", "data/b/coinrun")]
    assert outs == [str(tmp_path / "trials" / n / "s0") for n in names]
    several = config_name({"corpus": "s3://b/x/coinrun?region=eu=0.7,data/bigfish=0.3"})
    assert re.fullmatch(r"corpus=coinrun_region=eu=0\.7\+bigfish=0\.3-[0-9a-f]{6}", several), several


@pytest.mark.parametrize("change,message", [
    ({"grid": ("stage1.augment",)}, "expected FIELD=V1,V2"),
    ({"grid": ("stage1.lr=1", "stage1.lr=2")}, "stage1.lr given twice"),
    ({"seeds": 0}, "--seeds must be at least 1"),
])
def test_a_bad_sweep_is_refused_with_the_input_named(change, message):
    cfg = SWEEP_PRESETS["cpu"]()
    cfg.pretrain.corpus = "c"
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cfg, **change).validate()


def test_a_sweep_without_a_corpus_is_refused():
    with pytest.raises(ValueError, match="needs --pretrain.corpus"):
        SWEEP_PRESETS["cpu"]().validate()


def test_a_trial_is_the_base_config_with_its_values_its_seed_and_its_own_folder(tmp_path):
    base = SWEEP_PRESETS["cpu"]().pretrain
    base.corpus = "data/recipes/coinrun"
    cfg = trial_config(base, Trial({"stage1.augment": "shift", "model.vq.enabled": "false"}, 2), str(tmp_path))
    assert cfg.stage1.augment == "shift" and cfg.model.vq.enabled is False
    assert cfg.stage1.seed == 2 and cfg.data.shuffle_seed == 2
    assert cfg.out == str(tmp_path / "trials" / "augment=shift,enabled=false" / "s2")
    assert cfg.corpus == os.path.abspath("data/recipes/coinrun")  # trials run in Tune's folders
    assert dataclasses.replace(cfg.stage1, augment=base.stage1.augment, seed=base.stage1.seed) == base.stage1
    with pytest.raises(SystemExit):  # a bad value fails as the pretrain flag would, before any trial
        trial_config(base, Trial({"stage1.augment": "rotate"}, 0), str(tmp_path))


def test_one_ceiling_per_corpus_whatever_the_seed_or_recipe(tmp_path):
    base = SWEEP_PRESETS["cpu"]().pretrain
    base.corpus = str(tmp_path / "a")
    folders = {ceiling_folder(trial_config(base, Trial(values, seed), str(tmp_path)), str(tmp_path))
               for values in ({}, {"stage1.augment": "shift"}, {"model.vq.enabled": "false"}) for seed in (0, 1)}
    assert len(folders) == 1 and folders.pop().startswith(str(tmp_path / "ceilings"))
    other = trial_config(base, Trial({"corpus": str(tmp_path / "b")}, 0), str(tmp_path))
    longer = trial_config(base, Trial({"stage1.steps": "300"}, 0), str(tmp_path))
    first = ceiling_folder(trial_config(base, Trial({}, 0), str(tmp_path)), str(tmp_path))
    assert ceiling_folder(other, str(tmp_path)) != first and ceiling_folder(longer, str(tmp_path)) != first
    shared = dataclasses.replace(base, probe=dataclasses.replace(base.probe, ceiling_from=str(tmp_path / "shared")))
    assert ceiling_folder(shared, str(tmp_path)).startswith(str(tmp_path / "shared" / "ceilings"))


def _changed(value):
    """Another value of a config leaf's type (the key hashes values; it does not validate them)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, tuple):
        return (*value, 1)
    return f"{value}x"


def _leaves(d, prefix=""):
    for k, v in d.items():
        yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]


def _replaced(cfg, path: str, value):
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replaced(getattr(cfg, head), rest, value)})


def _get(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("path", ["stage1.weight_decay", "stage1.grad_clip", "model.frame_offset",
                                  "model.vq.emb_dim", "data.global_shuffle", "corpus"])
def test_the_ceiling_key_changes_with_what_the_ceiling_reads(path):
    base = SWEEP_PRESETS["cpu"]().pretrain
    base.corpus = "c"
    assert ceiling_key(_replaced(base, path, _changed(_get(base, path)))) != ceiling_key(base)


def test_the_ceiling_key_changes_with_the_precision_and_not_with_what_it_does_not_read():
    base = SWEEP_PRESETS["cpu"]().pretrain
    base.corpus = "c"
    for precision in ("bf16", "fp32"):
        other = _replaced(base, "stage1.precision", precision)
        assert ceiling_key(other) != ceiling_key(base)
        assert ceiling_folder(other, "/s") != ceiling_folder(base, "/s")
    for path, value in (("stage2.lr", 0.5), ("wandb.mode", "online"), ("wandb.project", "p"), ("out", "/x"),
                        ("stages", "stage1,label"), ("probe.triplets", 7), ("label.num_actors", 5),
                        ("stage1.augment", "shift"), ("stage1.seed", 9), ("data.shuffle_seed", 9),
                        ("model.vq.enabled", False), ("model.wm.base_channels", 3)):
        assert ceiling_folder(_replaced(base, path, value), "/s") == ceiling_folder(base, "/s"), path


def test_every_data_model_and_stage1_field_is_in_the_ceiling_key_unless_listed_as_not_read():
    base = PretrainConfig(corpus="c")
    leaves = [p for section in NOT_READ_BY_CEILING for p in _leaves(dataclasses.asdict(getattr(base, section)),
                                                                      f"{section}.")]
    assert len(leaves) > 50
    # Each listed field names a field (a stale entry would hide nothing, but would mislead).
    assert all(hasattr(getattr(base, s), k) for s, skip in NOT_READ_BY_CEILING.items() for k in skip)
    moved = {p for p in leaves if ceiling_key(_replaced(base, p, _changed(_get(base, p)))) != ceiling_key(base)}
    unread = {p for p in leaves if p.split(".")[1] in NOT_READ_BY_CEILING[p.split(".")[0]]}
    # The VQ's width decides the supervised IDM's latent layer, its other fields nothing of it.
    assert unread & moved == {"model.vq.num_codebooks", "model.vq.num_discrete_latents", "model.vq.emb_dim"}
    assert set(leaves) - unread <= moved


def test_the_table_gives_mean_and_t_interval_over_seeds():
    nan = float("nan")
    rows = [{"configuration": "a", "gap_closed": g, **{k: 0.5 for k in ("probe_acc", "floor_untrained_idm",
             "ceiling_supervised_idm", "info_bits_trained", "nmi_trained", "majority_rate")}}
            for g in (0.2, 0.4, 0.6)]
    rows += [dict(r, configuration="b", gap_closed=v) for r, v in zip(rows, (0.9, nan, nan))]
    summary = summarise(rows, "gap_closed")
    assert [e["configuration"] for e in summary] == ["b", "a"]  # ranked by the metric's mean
    a = summary[1]
    assert a["seeds"] == 3 and a["gap_closed_n"] == 3 and math.isclose(a["gap_closed"], 0.4)
    # t(0.975, 2) = 4.303, sd 0.2, n 3: half-width 0.4969
    assert math.isclose(a["gap_closed_half"], 4.3027 * 0.2 / math.sqrt(3), rel_tol=1e-3)
    assert summary[0]["gap_closed_n"] == 1 and math.isnan(summary[0]["gap_closed_half"])
    table = render_table(summary, "gap_closed")
    assert "| a | 3 | 0.400 ± 0.497 |" in table and "| b | 3 | 0.900 (1 of 3) |" in table


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_its_finished_trial(tmp_path, ray_local):
    from test_data import write_lapo_npz

    corpus = tmp_path / "npz"
    write_lapo_npz(corpus, n_files=4, n=130)
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--pretrain.corpus", str(corpus), "--seeds", "2", "--max-concurrent", "1",
            "--pretrain.stage1.steps", "3", "--pretrain.stage1.batch-size", "16", "--pretrain.probe.triplets", "200",
            "--pretrain.probe.max-epochs", "5"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    log_path = tmp_path / "sweep.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "sweep.py"), *argv], cwd=REPO, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    first = out / "trials" / "baseline" / "s0" / "probe.json"
    deadline = time.monotonic() + 420
    try:  # killed once Tune has recorded the first trial as finished, while the second runs
        while "sweep: trial 1/2 baseline s0" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.2)
        time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert first.exists()
    assert not (out / "sweep.md").exists()
    assert library_lines(log_path.read_text(errors="replace")) == []  # no Tune box, no Ray Train commentary
    ceilings = list((out / "ceilings").iterdir())
    kept = first.stat().st_mtime_ns

    from lapo_ray.pipelines.sweep import run_sweep

    result = run_sweep(_parse(argv))
    assert first.stat().st_mtime_ns == kept  # the finished trial did not run again
    assert list((out / "ceilings").iterdir()) == ceilings  # nor did the ceiling
    assert result["trials"] == 2
    with open(out / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert [(t["configuration"], t["seed"]) for t in trials] == [("baseline", "0"), ("baseline", "1")]
    for t in trials:
        probe = json.loads((Path(t["out"]) / "probe.json").read_text())
        assert math.isclose(float(t["probe_acc"]), probe["probe_acc"])
        assert probe["ceiling_supervised_idm"] == json.loads(first.read_text())["ceiling_supervised_idm"]
    assert (out / "plots" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| baseline | 2 |" in (out / "sweep.md").read_text()
