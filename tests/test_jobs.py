"""The jobs as a first-time user meets them: bad input ends in one line naming it, exit status 2,
no traceback, and nothing already in the artifact folder changes; an error that is not the input's
keeps its traceback and exits 1."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest
from test_data import encode_video, moving_square_frames, write_lapo_npz

REPO = Path(__file__).resolve().parents[1]


def load_script(path: str):
    """A script of the repository (a job in jobs/, an analysis script in docs/results/) as a
    module, loaded from its file as `python <path>` would run it: scripts are not a package."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(name: str):
    """A job's module, loaded from jobs/ as `python jobs/<name>.py` would run it."""
    return load_script(f"jobs/{name}.py")


# Lines of Ray's that a job's console must not show: its INFO log records (a timestamp, then
# INFO), Ray Train's and Ray Data's running commentary, Tune's configuration box, tips on how to
# turn features on, deprecation notes raised inside Ray's own actors, and old gym's banner.
LIBRARY_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+INFO |\[State Transition\]|Reporting training result|"
    r"Execution plan of Dataset|Starting execution of Dataset|Dataset \S+ execution finished|progress UI|"
    r"Progress bars disabled|tqdm is not installed|Configuration for experiment|To visualize your results|"
    r"Requesting resources|training worker group|Setting up process group|DeprecationWarning|"
    r"Token authentication is enabled|Gym has been unmaintained|Please upgrade to Gymnasium|"
    r"Users of this version of Gym|migration_guide")


def library_lines(console: str) -> list[str]:
    """The lines of a job's console that are Ray's commentary rather than the job's own."""
    return [line for line in console.splitlines() if LIBRARY_LINE.search(line)]


def test_library_lines_are_told_from_the_jobs_own():
    ours = ["ray: a local instance of 2 CPUs, dashboard at http://127.0.0.1:8265",
            "\x1b[36m(RayTrainWorker pid=14992)\x1b[0m [stage1] step 50/150 (33%) train/wm_loss=0.09836 | ETA 1.6 min",
            "probe: 174 triplets, 11s: probe_acc 0.155, floor_untrained_idm 0.172",
            "sweep: trial 1/18 baseline s0: gap_closed 0.503 | 12.0 trials/h | elapsed 05:00 | ETA 1:25:00",
            "labelling: 1/3 shards (33.3%) | 0.1 shards/s | elapsed 00:19 | ETA 00:38"]
    # Seen in consoles of 2026-12-03, before the jobs quieted Ray.
    theirs = [
        "2026-12-03 11:50:14,301\tINFO tune_controller.py:448 -- Restoring the run from the latest experiment state",
        "(TrainController pid=14846) [State Transition] INITIALIZING -> SCHEDULING.",
        "(RayTrainWorker pid=14992) Reporting training result 1: TrainingReport(checkpoint=None, metrics={})",
        "(RayTrainWorker pid=14992) Starting execution of Dataset val_0358Fx_0. Full logs are in /tmp/ray/x",
        "(RayTrainWorker pid=14992) Execution plan of Dataset val_0358Fx_0: InputDataBuffer[Input] -> ...",
        "(SplitCoordinator pid=15396) \u2714\ufe0f  Dataset train_0358Fy_0 execution finished in 15.27 seconds",
        "(RayTrainWorker pid=14992) [dataset]: A new progress UI is available. To enable, set ...",
        "2026-12-03 11:50:54,698\tWARNING tqdm_ray.py:319 -- tqdm is not installed. Progress bars will be disabled.",
        "\u2502 Configuration for experiment     tune                  \u2502",
        "(TrainController pid=14846) Requesting resources: {'CPU': 1.0} * 1",
        "(TrainController pid=18135) execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources`",
        "2026-12-03 11:54:57,278\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this",
        # Seen in the fidelity study's console of 2026-12-07, from every Collector.
        "(Collector pid=20435) Gym has been unmaintained since 2022 and does not support NumPy 2.0 amongst other",
        "(Collector pid=20435) Please upgrade to Gymnasium, the maintained drop-in replacement of Gym, or contact",
        "(Collector pid=20435) Users of this version of Gym should be able to simply replace 'import gym' with",
        "(Collector pid=20435) See the migration guide at https://gymnasium.farama.org/introduction/migration_guide/",
    ]
    assert library_lines("\n".join(ours)) == []
    assert library_lines("\n".join(ours + theirs)) == theirs


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash: "nothing changed" means equal trees."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bad_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (corpus path, text the one-line error must contain)."""
    cases = {}
    (root / "empty").mkdir()
    cases["empty folder"] = (root / "empty", "the folder is empty")
    (root / "txt").mkdir()
    for i in range(2):
        (root / "txt" / f"notes{i}.txt").write_text("hello")
    cases["folder of .txt"] = (root / "txt", "notes0.txt")
    (root / "zero").mkdir()
    (root / "zero" / "a.mp4").write_bytes(b"")
    cases["zero-byte video"] = (root / "zero", "a.mp4")
    (root / "one").mkdir()
    encode_video(root / "one" / "a.avi", moving_square_frames(1), "png", "rgb24")
    cases["one-frame video"] = (root / "one", "a.avi: video has 1 frame(s)")
    write_lapo_npz(root / "npz", n_files=1, n=130, drop="obs")
    cases["npz with wrong keys"] = (root / "npz", "0.npz: npz has no 'obs' array")
    cases["missing path"] = (root / "does-not-exist", "does-not-exist")
    (root / "garbage").mkdir()
    (root / "garbage" / "manifest.json").write_text("{this is not json")
    cases["garbage manifest.json"] = (root / "garbage", "manifest.json")
    return cases


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    return _bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.fixture()
def existing_run(tmp_path):
    """An artifact folder that holds an earlier run's files, which no failed start may touch."""
    out = tmp_path / "run"
    (out / "stage1").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"earlier": "run"}))
    (out / "stage1" / "state.json").write_text('{"step": 7}')
    return out


CASES = ["empty folder", "folder of .txt", "zero-byte video", "one-frame video", "npz with wrong keys",
         "missing path", "garbage manifest.json"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_pretrain_bad_corpus_is_one_line_exit_2_and_leaves_out_untouched(case, bad_inputs, existing_run, capsys,
                                                                       ray_local):
    main = _job("pretrain").main

    corpus, expected = bad_inputs[case]
    before = _tree(existing_run)
    code = main(["--corpus", str(corpus), "--out", str(existing_run), "--wandb.mode", "disabled"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert _tree(existing_run) == before


def test_pretrain_error_is_one_line_in_a_fresh_process(bad_inputs, tmp_path):
    """The real command line: no traceback on stderr, exit status 2, --out never created."""
    corpus, _ = bad_inputs["missing path"]
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "jobs/pretrain.py", "--corpus", str(corpus), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert str(corpus) in r.stderr
    assert not out.exists()


# A job whose library call is replaced by one that raises ``{raise_}``: the job runs as
# `python jobs/evaluate.py` does, in a fresh process, so Python itself sets the exit status.
INJECTED = """
import runpy, sys
import numpy as np
import lapo_ray.rl.evaluate
from lapo_ray import UsageError

def evaluate_agent(cfg):
    {raise_}

lapo_ray.rl.evaluate.evaluate_agent = evaluate_agent
sys.argv = ["jobs/evaluate.py", "--agent", "artifacts/finetune"]
runpy.run_path("jobs/evaluate.py", run_name="__main__")
"""


def _evaluate_raising(raise_: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", INJECTED.format(raise_=raise_)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "LAPO_DEBUG"})


def test_an_internal_error_in_a_job_keeps_its_traceback_and_exits_1():
    """A ValueError from numpy is a bug, not bad input: no one-line "error:", the traceback, exit 1."""
    r = _evaluate_raising("np.zeros(3).reshape(2, 2)")
    assert r.returncode == 1, r.stderr
    assert "Traceback (most recent call last)" in r.stderr and "evaluate_agent" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "ValueError: cannot reshape array of size 3 into shape (2,2)"
    assert "error: " not in r.stderr
    r = _evaluate_raising("raise UsageError('--agent artifacts/finetune: no trained agent')")
    assert r.returncode == 2 and r.stderr == "error: --agent artifacts/finetune: no trained agent\n", r.stderr


def test_a_missing_agent_folder_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LAPO_DEBUG", raising=False)
    assert _job("evaluate").main(["--agent", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nothing'}: not a finetune or decode artifact folder (no config.json)\n"


def test_a_pretrain_folder_without_checkpoints_fails_before_ray_and_before_out(tmp_path):
    out = tmp_path / "ft"
    r = subprocess.run([sys.executable, "jobs/finetune.py", "--pretrain", str(tmp_path / "run"), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"error: {tmp_path / 'run'}: no stage1 checkpoint; run `python jobs/pretrain.py --out "
                        f"{tmp_path / 'run'}` first (or pass --scratch true for PPO from scratch)\n"), r.stderr
    assert "ray: a local instance" not in r.stdout and not out.exists()


def _starts_ray(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return any(a.name == "init_ray" for a in node.names)
    return (isinstance(node, ast.Attribute) and node.attr == "init" and isinstance(node.value, ast.Name)
            and node.value.id == "ray")


def test_no_job_starts_ray_itself():
    """The library call of each job starts Ray once its input is checked (docs/architecture.md)."""
    starters = [f"{p.name}:{node.lineno}" for p in sorted((REPO / "jobs").glob("*.py"))
                for node in ast.walk(ast.parse(p.read_text())) if _starts_ray(node)]
    assert starters == []
    assert _starts_ray(ast.parse("from lapo_ray.runtime import init_ray").body[0])
    assert _starts_ray(ast.parse("ray.init()").body[0].value.func)


@pytest.mark.slow
def test_pretrain_refuses_to_mix_another_config_into_an_existing_folder(tmp_path, ray_local, capsys):
    main = _job("pretrain").main

    corpus = tmp_path / "npz"
    write_lapo_npz(corpus, n_files=2, n=130)
    out = tmp_path / "run"
    out.mkdir()
    from lapo_ray.config import PRETRAIN_PRESETS

    cfg = PRETRAIN_PRESETS["cpu"]()
    cfg.out, cfg.corpus, cfg.stage1.lr = str(out), str(corpus), 1e-3
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    before = _tree(out)
    code = main(["--corpus", str(corpus), "--out", str(out), "--stage1.lr", "5e-4", "--stages", "stage1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "stage1.lr: 0.001 -> 0.0005" in err[0] and "--allow-config-change true" in err[0], err[0]
    assert _tree(out) == before


def test_a_frame_size_other_than_the_corpus_fails_before_ray_starts(tmp_path):
    """--model.frame-size 32 on 64x64 frames: one line naming both shapes, before any Ray work
    (it once failed inside a Train worker with a byte-count error)."""
    corpus = tmp_path / "npz"
    write_lapo_npz(corpus, n_files=1, n=130)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "jobs/pretrain.py", "--corpus", str(corpus), "--out", str(out),
                        "--model.frame-size", "32"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "frames are (64, 64, 3) (H, W, C) but the model expects (32, 32, 3)" in line, line
    assert "Started a local Ray instance" not in r.stdout + r.stderr
    assert not out.exists()


def test_model_preset_is_chosen_apart_from_the_run_budget():
    from lapo_ray.config import PRETRAIN_PRESETS, PretrainConfig
    from lapo_ray.config.cli import parse_config
    from lapo_ray.config.models import cpu_model_config, paper_model_config

    cpu_run = PRETRAIN_PRESETS["cpu"]()
    cfg, _ = parse_config(PretrainConfig, PRETRAIN_PRESETS, ["--model-preset", "paper"])
    assert cfg.model == paper_model_config() and cfg.stage1 == cpu_run.stage1  # paper networks, cpu budget
    cfg, _ = parse_config(PretrainConfig, PRETRAIN_PRESETS,
                          ["--preset", "paper", "--model-preset", "cpu", "--model.vq.num-embs", "32"])
    assert cfg.model.vq.num_embs == 32 and cfg.model.idm == cpu_model_config().idm
    assert cfg.stage1 == PRETRAIN_PRESETS["paper"]().stage1
    cfg, _ = parse_config(PretrainConfig, PRETRAIN_PRESETS, [])
    assert cfg.model == cpu_run.model
