"""The Python API of a trained run without Ray: ``lapo_ray.load_run``, its helpers, and the export
(``export_run``, ``jobs/export.py``) that it reads back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_rl import pretrain_dir, tiny_pretrain_config  # noqa: F401 (a fixture)
from test_step import blocking

from lapo_ray import MissingPathError, UsageError, export_run, load_run
from lapo_ray.train.checkpoint import Checkpoint, load_dynamics, load_latent_policy


@pytest.fixture(scope="module")
def run_dir(pretrain_dir, tmp_path_factory) -> str:
    """test_rl's pretrain folder (real checkpoint layout, seeded random weights) with each
    checkpoint's stage named, as the stage loop writes it, and a probe.json."""
    out = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(pretrain_dir, out)
    for stage in ("stage1", "stage2"):
        state = out / stage / "checkpoint_000000" / "state.json"
        state.write_text(json.dumps({**json.loads(state.read_text()), "stage": stage}))
    (out / "probe.json").write_text(json.dumps({"probe_acc": 0.61, "floor_untrained_idm": 0.3,
                                                "ceiling_supervised_idm": 0.9, "gap_closed": 0.52,
                                                "nmi_trained": 0.2}))
    return str(out)


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> str:
    return export_run(run_dir, str(tmp_path_factory.mktemp("exports") / "export"))


def frames(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def outputs(run) -> dict[str, np.ndarray]:
    """Every helper's output on fixed inputs."""
    labels = run.latent_actions(frames(20), batch_size=7)
    obs = frames(4, seed=1)
    return {**labels, "act": run.act(obs), "predict": run.predict(obs, frames(4, seed=2), labels["latent"][:4])}


def test_load_run_gives_the_checkpoints_models_in_eval_mode(run_dir):
    run = load_run(run_dir)
    dynamics = load_dynamics(Checkpoint.latest(os.path.join(run_dir, "stage1")).uri)
    policy, _ = load_latent_policy(Checkpoint.latest(os.path.join(run_dir, "stage2")).uri)
    triplets = torch.from_numpy(frames(3)[None])
    assert not any(m.training for m in (run.idm, run.world_model, run.latent_policy))
    for got, expected in zip(run.dynamics.encode(triplets), dynamics.encode(triplets)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(run.latent_policy(triplets[0]), policy(triplets[0]), rtol=0, atol=0)
    assert run.config == json.loads(json.dumps(tiny_pretrain_config().to_dict())) and run.model_config == tiny_pretrain_config().model


def test_latent_actions_label_every_complete_triplet(run_dir):
    run = load_run(run_dir)
    video = frames(20)
    labels = run.latent_actions(video)  # one batch: the same convolutions as the reference's
    latent, codes = run.dynamics.encode(torch.from_numpy(np.stack([video[:-2], video[1:-1], video[2:]], axis=1)))
    assert labels["latent"].shape == (18, run.model_config.latent_dim) and len(labels["codes"]) == 18
    np.testing.assert_array_equal(labels["latent"], latent.numpy())
    np.testing.assert_array_equal(labels["codes"], codes.numpy())
    batched = run.latent_actions(video, batch_size=7)  # 7 + 7 + 4 rows, in order
    np.testing.assert_allclose(batched["latent"], labels["latent"], rtol=0, atol=1e-6)


def test_act_and_predict_shapes(run_dir):
    got = outputs(load_run(run_dir))
    assert got["act"].shape == (4, load_run(run_dir).model_config.latent_dim) and got["act"].dtype == np.float32
    assert got["predict"].shape == (4, 64, 64, 3) and got["predict"].dtype == np.uint8


def test_an_export_loads_to_identical_outputs_and_carries_a_model_card(run_dir, export_dir):
    expected, got = outputs(load_run(run_dir)), outputs(load_run(export_dir))
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    names = sorted(os.listdir(export_dir))
    assert names == ["README.md", "config.json", "dynamics.safetensors", "latent_policy.safetensors", "probe.json"]
    card = open(os.path.join(export_dir, "README.md")).read()
    assert "0.6100" in card and "0.5200" in card and f'load_run("{export_dir}")' in card
    assert not [n for n in os.listdir(os.path.dirname(export_dir)) if ".tmp-" in n]
    with pytest.raises(UsageError, match="--replace true"):
        export_run(run_dir, export_dir)
    with pytest.raises(UsageError, match="is not an export"):
        export_run(run_dir, run_dir, replace=True)


def test_a_failed_export_leaves_nothing(run_dir, tmp_path, monkeypatch):
    import lapo_ray.train.run as run_module

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(run_module, "model_card", broken)
    with pytest.raises(RuntimeError):
        export_run(run_dir, str(tmp_path / "export"))
    assert os.listdir(tmp_path) == []


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_naming_it(run_dir, tmp_path):
    with pytest.raises(UsageError) as e:
        load_run(str(tmp_path))
    assert str(tmp_path) in one_line(e) and "not a run" in one_line(e)
    stage2 = Checkpoint.latest(os.path.join(run_dir, "stage2")).uri
    with pytest.raises(UsageError) as e:
        load_run(stage2)
    assert stage2 in one_line(e) and "stage2 checkpoint" in one_line(e)
    with pytest.raises(MissingPathError):
        load_run(str(tmp_path / "nowhere"))
    run = load_run(run_dir)
    with pytest.raises(UsageError) as e:
        run.latent_actions(frames(20, size=32))
    assert one_line(e).startswith("frames:") and "(20, 32, 32, 3)" in one_line(e)
    with pytest.raises(UsageError) as e:
        run.latent_actions(frames(2))
    assert one_line(e).startswith("frames: 2 frames")


def test_an_export_loads_and_labels_without_ray(export_dir):
    script = blocking("ray", "wandb") + textwrap.dedent(f"""
        import numpy as np
        from lapo_ray import load_run

        run = load_run({export_dir!r})
        labels = run.latent_actions(np.zeros((5, 64, 64, 3), np.uint8))
        assert labels["latent"].shape[0] == 3 and run.act(np.zeros((2, 64, 64, 3), np.uint8)).shape[0] == 2
        assert not [m for m in sys.modules if m.split(".")[0] == "ray"]
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_export_job_writes_an_export_and_refuses_a_bad_run_in_one_line(run_dir, tmp_path, capsys):
    from test_jobs import _job

    assert _job("export").main(["--run", run_dir, "--out", str(tmp_path / "e")]) == 0
    assert load_run(str(tmp_path / "e")).latent_policy is not None
    assert _job("export").main(["--run", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {tmp_path}: not a run")
