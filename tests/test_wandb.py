"""wandb offline: one run per stage, grouped by the job, metrics and plots read back from the run files.

The offline run files are read without wandb's servers: ``run-<id>.wandb`` is a log of protobuf
``Record``s in LevelDB's log format (32 KiB blocks of CRC'd chunks), read below with
``wandb.proto``; the images are the PNG files under ``files/media/images``.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pickle
import struct
import threading
import time
from pathlib import Path

import pytest

from lapo_ray.config import PRETRAIN_PRESETS, WandbConfig
from lapo_ray.train.metrics import MetricsSink, WandbRun, read_metrics, wandb_mode

PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- reading an offline run


def _records(path: str):
    """The protobuf records of a ``.wandb`` transaction log."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        if pos + 7 + n > len(data):  # a chunk still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


@dataclasses.dataclass
class OfflineRun:
    dir: str
    run: object  # the RunRecord
    config: dict
    history: list  # one dict per step
    summary: dict

    @property
    def images(self) -> dict[str, dict]:
        """Image entries of the summary, by key: path (within files/), sha256, width, height."""
        out: dict[str, dict] = {}
        for key, value in self.summary.items():
            head, _, field = key.rpartition("/")
            if head:
                out.setdefault(head, {})[field] = value
        return {k: v for k, v in out.items() if v.get("_type") == "image-file"}


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_runs(root: str) -> list[OfflineRun]:
    runs = []
    for d in sorted(glob.glob(os.path.join(root, "wandb", "offline-run-*"))):
        (path,) = glob.glob(os.path.join(d, "run-*.wandb"))
        # wandb-core writes a run's last records a few ms after ``finish()`` returns.
        deadline = time.monotonic() + 30
        records = _records(path)
        while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
            time.sleep(0.05)
            records = _records(path)
        run, config, history, summary = None, {}, [], {}
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
                config = {i.key: json.loads(i.value_json) for i in r.run.config.update}
            elif kind == "history":
                history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        runs.append(OfflineRun(d, run, config, history, summary))
    return runs


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """CI's empty HOME; no key, no netrc, no wandb variables from the machine."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for k in list(os.environ):
        if k.startswith("WANDB_"):
            monkeypatch.delenv(k)
    return home


def _wandb_files_in(home: Path) -> list[str]:
    return [str(p) for p in home.rglob("*") if "wandb" in str(p.relative_to(home)).lower()]


# --------------------------------------------------------------------------- without Ray


def test_a_stage_run_offline_holds_its_rows_summary_and_plot(tmp_path, empty_home, capfd):
    from lapo_ray.evaluation.plots import plot_training_curves

    out = str(tmp_path / "job-7")
    assert wandb_mode(WandbConfig()) == "offline"
    sink = MetricsSink(out, "stage1")
    rows = [{"step": s, "train/wm_loss": 1.0 / s, "val/wm_loss": 2.0 / s, "done": s == 6, "note": "x"}
            for s in (2, 4, 6)]

    def writer():  # rank 0, appending while the driver follows the file
        for row in rows:
            time.sleep(0.1)
            sink.log(row)

    with WandbRun(WandbConfig(), out, "stage1", {"stage1": {"lr": 3e-4}}) as wb:
        with wb.following(sink.path, every_s=0.05):
            t = threading.Thread(target=writer)
            t.start()
            t.join()
        plot_training_curves(read_metrics(out), os.path.join(out, "plots", "training_curves.png"))
        assert wb.log_images([os.path.join(out, "plots", n) for n in ("training_curves.png", "absent.png")]) \
            == ["plots/training_curves"]
        wb.log_summary({"probe_acc": 0.25, "floor": {"acc": 0.1}, "label": "text"}, "probe")

    (run,) = read_offline_runs(out)
    assert (run.run.run_group, run.run.job_type, run.run.display_name, run.run.project) == \
        ("job-7", "stage1", "job-7-stage1", "lapo_ray")
    assert run.config["stage1"] == {"lr": 3e-4}
    assert [h["_step"] for h in run.history] == [2, 4, 6]
    for h, row in zip(run.history, rows):
        assert h["train/wm_loss"] == row["train/wm_loss"] and h["val/wm_loss"] == row["val/wm_loss"]
        assert "note" not in h and "step" not in h and h["done"] == row["done"]
    assert run.summary["probe/probe_acc"] == 0.25 and run.summary["probe/floor/acc"] == 0.1
    assert "probe/label" not in run.summary
    img = run.images["plots/training_curves"]
    media = Path(run.dir, "files", img["path"])
    assert media.read_bytes()[:8] == PNG
    plot = Path(out, "plots", "training_curves.png").read_bytes()
    assert img["sha256"] == hashlib.sha256(plot).hexdigest() == hashlib.sha256(media.read_bytes()).hexdigest()
    assert run.history[-1]["plots/training_curves/_type"] == "image-file" and run.history[-1]["_step"] == 6

    # Quiet, and everything under the artifact folder: nothing of wandb's in HOME.
    captured = capfd.readouterr()
    assert "wandb" not in captured.out + captured.err, captured
    assert _wandb_files_in(empty_home) == []


def test_disabled_makes_no_run_and_online_without_a_key_goes_offline(tmp_path, empty_home, capfd):
    out = str(tmp_path / "off")
    sink = MetricsSink(out, "stage2", WandbRun(WandbConfig(mode="disabled"), out, "stage2"))
    sink.log({"step": 1, "train/loss": 0.5})
    assert read_metrics(out, "stage2")[0]["train/loss"] == 0.5
    assert not os.path.exists(os.path.join(out, "wandb"))

    out = str(tmp_path / "on")
    with WandbRun(WandbConfig(project="someone", mode="online"), out, "finetune-rl") as wb:
        wb.log({"step": 128, "episode_return": 1.5})
    assert "no API key" in capfd.readouterr().out
    (run,) = read_offline_runs(out)
    assert (run.run.project, run.run.job_type, run.history[0]["episode_return"]) == ("someone", "finetune-rl", 1.5)


def test_a_wandb_that_fails_is_one_line_and_the_metrics_go_on(tmp_path, empty_home, monkeypatch, capfd):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken)
    out = str(tmp_path / "j")
    with WandbRun(WandbConfig(mode="offline"), out, "stage1") as wb:
        sink = MetricsSink(out, "stage1", wb)
        for step in (1, 2):
            sink.log({"step": step, "train/loss": 1.0})
        assert wb.log_images([]) == [] and wb.run is None
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert capfd.readouterr().out.splitlines() == [
        "wandb: not logging stage1 any more (RuntimeError: no service)"]
    wb.log({"step": 3, "x": 1.0})  # finished: nothing, and no second run


def test_a_sink_with_a_wandb_config_pickles_unstarted_and_logs_where_it_runs(tmp_path, empty_home):
    out = str(tmp_path / "grp-run")
    sink = MetricsSink(out, "finetune-rl", WandbConfig(group="exp-3"), {"seed": 1})
    sink = pickle.loads(pickle.dumps(sink))  # as Ray would send it
    sink.log({"step": 10, "loss": 3.0})
    sink.finish()
    (run,) = read_offline_runs(out)
    assert (run.run.run_group, run.run.display_name, run.history[0]["loss"]) == ("exp-3", "grp-run-finetune-rl", 3.0)


def test_an_experiment_groups_all_its_runs_and_logging_is_no_config_change(tmp_path):
    from lapo_ray.config.experiment import cpu_experiment
    from lapo_ray.pipelines.pretrain import check_artifact_folder

    exp = cpu_experiment()
    exp.out = str(tmp_path / "exp-coinrun")
    r = exp.resolved()
    assert {r.pretrain.wandb.group, r.finetune.wandb.group, r.demonstrator.wandb.group} == {"exp-coinrun"}
    exp.pretrain.wandb = WandbConfig(group="mine")
    assert exp.resolved().pretrain.wandb.group == "mine"

    cfg = dataclasses.replace(PRETRAIN_PRESETS["cpu"](), out=str(tmp_path / "run"))
    os.makedirs(cfg.out)
    Path(cfg.out, "config.json").write_text(json.dumps(cfg.to_dict()))
    check_artifact_folder(dataclasses.replace(cfg, wandb=WandbConfig(mode="disabled", group="g")))
    with pytest.raises(ValueError, match="another config"):
        check_artifact_folder(dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, lr=0.5)))


# --------------------------------------------------------------------------- a real pretraining job on Ray


@pytest.mark.slow
def test_pretraining_offline_is_one_run_per_stage_with_its_metrics_and_plots(pretrained_run):
    """The shared pretraining job (conftest.PRETRAINED_FLAGS: every stage, wandb offline), run as
    `python jobs/pretrain.py` with HOME an empty folder."""
    check_pretraining_runs(str(pretrained_run["out"]))
    console = pretrained_run["console"].splitlines()
    assert not [line for line in console if line.startswith("wandb")], console
    assert _wandb_files_in(pretrained_run["home"]) == []


def check_pretraining_runs(out: str) -> None:
    """Three runs (stage1, ceiling, stage2) in the job's group, each with every row of its stage at
    its step, stage 1's probe figures in its summary, the plots as PNG images."""
    runs = {r.run.job_type: r for r in read_offline_runs(out)}
    assert sorted(runs) == ["ceiling", "stage1", "stage2"] and len(read_offline_runs(out)) == 3
    job = os.path.basename(out)
    for stage, run in runs.items():
        assert run.run.run_group == job and run.run.display_name == f"{job}-{stage}"
        assert run.config["stage1"]["steps"] == 4  # the job's config (conftest.PRETRAINED_FLAGS)
        if stage == "ceiling":
            rows = [json.loads(line) for line in open(os.path.join(out, "ceiling", "metrics.jsonl"))]
        else:
            rows = read_metrics(out, stage)
        assert [r["step"] for r in rows] == [h["_step"] for h in run.history] == [2, 4]
        for h, row in zip(run.history, rows):
            numbers = {k: v for k, v in row.items() if k not in ("stage", "time", "step")
                       and isinstance(v, (int, float))}
            assert "train/loss" in numbers and "lr" in numbers and "samples_per_s" in numbers
            assert {k: h[k] for k in numbers} == numbers, stage
    s1, s2 = runs["stage1"], runs["stage2"]
    assert s1.history[-1]["train/wm_loss"] == read_metrics(out, "stage1")[-1]["train/wm_loss"]
    assert s2.history[-1]["val/loss"] == read_metrics(out, "stage2")[-1]["val/loss"]

    probe = json.load(open(os.path.join(out, "probe.json")))
    assert s1.summary["probe/probe_acc"] == probe["probe_acc"]
    assert set(s1.images) == {"plots/atlas", "plots/latent_map", "plots/training_curves"}
    assert set(s2.images) == {"plots/training_curves"} and not runs["ceiling"].images
    for run in (s1, s2):
        for img in run.images.values():
            data = Path(run.dir, "files", img["path"]).read_bytes()
            assert data[:8] == PNG and hashlib.sha256(data).hexdigest() == img["sha256"]
    latent_map = Path(out, "plots", "latent_map.png").read_bytes()
    assert s1.images["plots/latent_map"]["sha256"] == hashlib.sha256(latent_map).hexdigest()


@pytest.mark.slow
def test_finetuning_offline_logs_env_steps_the_return_curve_and_each_iterations_own_time(
        tmp_path, empty_home, ray_local, monkeypatch):
    import math
    import types

    from ray.rllib.core.learner.learner_group import LearnerGroup

    from lapo_ray.rl import algo
    from test_rl import tiny_finetune

    # RLlib's timers are EMAs (coefficient 0.01): a learner update that takes eight seconds longer in
    # the third iteration would move them by ~0.08 s (the first iteration is slow anyway: warm-up).
    # metrics.jsonl must show the eight seconds themselves, and the parts must fit inside the
    # iteration's wall time. The finetune loop's clock jumps 8 s inside the third update instead of
    # the test sleeping them: nothing real is waited for, and a jump in the clock the loop reads is
    # the same to it as a slow update, without the real updates' noise on shared cores
    # (docs/results/rl-notes.md).
    skipped = [0.0]
    monkeypatch.setattr(algo, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0]))
    calls = []
    update = LearnerGroup.update

    def update_slow_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            skipped[0] += 8.0
        return update(self, *args, **kwargs)

    monkeypatch.setattr(LearnerGroup, "update", update_slow_once)
    cfg = tiny_finetune(None, str(tmp_path / "ft-scratch"))
    cfg.wandb = WandbConfig(mode="offline", group="exp-9")
    cfg.ppo.env_steps, cfg.checkpoint_every = 4 * cfg.train_batch, 100
    algo.finetune(cfg)

    (run,) = read_offline_runs(cfg.out)
    assert (run.run.run_group, run.run.job_type, run.run.display_name) == ("exp-9", "finetune-scratch",
                                                                             "ft-scratch-finetune-scratch")
    rows = read_metrics(cfg.out)
    assert [h["_step"] for h in run.history] == [r["env_steps"] for r in rows] == [
        k * cfg.train_batch for k in (1, 2, 3, 4)]
    for h, row in zip(run.history, rows):
        for key in ("episode_return", "policy_loss", "vf_loss", "iteration_seconds", "iteration"):
            assert h[key] == row[key] or (math.isnan(h[key]) and math.isnan(row[key])), key
        # PPO from scratch on 2 env runners: finite losses, and no decoder to supervise.
        assert all(math.isfinite(row[key]) for key in ("policy_loss", "vf_loss", "entropy")), row
        assert math.isnan(row["decoder_accuracy"])
    assert len(calls) == 4
    learn = [r["learn_seconds"] for r in rows]
    assert learn[2] - max(learn[1], learn[3]) > 5.0, learn  # an EMA would have moved by ~0.08 s
    for r in rows:
        assert 0 < r["sample_seconds"] and 0 < r["learn_seconds"]
        assert r["sample_seconds"] + r["learn_seconds"] <= r["iteration_seconds"]
    assert len({r["sample_seconds"] for r in rows}) == 4  # each iteration its own measurement
    img = run.images["plots/return"]
    curve = Path(cfg.out, "plots", "return.png").read_bytes()
    assert curve[:8] == PNG and img["sha256"] == hashlib.sha256(curve).hexdigest()
    assert _wandb_files_in(empty_home) == []
