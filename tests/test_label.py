"""jobs/label.py: any corpus labelled with a trained stage-1 checkpoint, resumable, on a cluster."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from lapo_ray import load_run
from lapo_ray.config import PRETRAIN_PRESETS
from lapo_ray.config.label import LABEL_PRESETS, LabelJobConfig
from test_data import encode_video, moving_square_frames, write_lapo_npz
from test_jobs import load_script

REPO = Path(__file__).resolve().parents[1]


def _job():
    return load_script("jobs/label.py")


def _videos(folder: Path, lengths: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        frames = np.roll(moving_square_frames(n + i), -i, axis=0)[:n]
        encode_video(folder / f"clip{i:02d}.mp4", frames, "libx264", "yuv420p")
    return folder


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shards(out: Path) -> dict[str, Path]:
    d = out / "latents"
    return {p.name: p for p in sorted(d.glob("*.parquet"))} if d.exists() else {}


# --------------------------------------------------------------------------- fast: flags and errors


def test_every_label_job_field_has_a_one_line_help_and_the_presets_validate():
    seen, todo = [], [LabelJobConfig]
    while todo:
        cls = todo.pop()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                todo.append(hints[f.name])
            else:
                seen.append((cls.__name__, f.name, f.metadata.get("help", "")))
    bad = [f"{c}.{n}" for c, n, h in seen if not h.strip() or "\n" in h]
    assert not bad, bad
    assert ("LabelConfig", "num_gpus_per_actor") in {(c, n) for c, n, _ in seen}
    for name, preset in LABEL_PRESETS.items():
        dataclasses.replace(preset(), checkpoint="ckpt", corpus="corpus").validate()
    assert LABEL_PRESETS["paper"]().label.num_gpus_per_actor == 0.25


@pytest.mark.parametrize("argv,needle", [
    (["--corpus", "c"], "--checkpoint is required"),
    (["--checkpoint", "c"], "--corpus is required"),
    (["--checkpoint", "c", "--corpus", "c", "--label.num-actors", "0"], "--label.num-actors must be positive"),
    (["--checkpoint", "c", "--corpus", "c", "--label.num-gpus-per-actor", "1.5"], "whole number of GPUs"),
])
def test_flag_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        _job().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_the_flags_reach_the_config():
    cfg, _ = _job().parse_args(["--checkpoint", "s3://b/run", "--corpus", "v", "--out", "o",
                                "--label.num-gpus-per-actor", "0.5", "--data.on-bad-files", "skip"])
    assert (cfg.checkpoint, cfg.corpus, cfg.out) == ("s3://b/run", "v", "o")
    assert cfg.label.num_gpus_per_actor == 0.5 and cfg.data.on_bad_files == "skip"
    assert cfg.label.num_actors == 2 and cfg.label.cpus_per_actor == 0.5  # the cpu preset


def _fake_checkpoint(folder: Path, frame_size: int = 64, stage: str = "stage1") -> Path:
    """A checkpoint folder whose files are there; only its config is read before Ray starts."""
    cfg = PRETRAIN_PRESETS["cpu"]()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, frame_size=frame_size))
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"")
    (folder / "state.json").write_text(json.dumps({"step": 1, "stage": stage, "done": True}))
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    return folder


@pytest.fixture
def npz_corpus(tmp_path):
    write_lapo_npz(tmp_path / "npz", n_files=1, n=130)
    return tmp_path / "npz"


def _one_line_error(argv, capsys, *needles):
    assert _job().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_a_missing_checkpoint_is_one_line_naming_it(tmp_path, npz_corpus, capsys):
    missing = tmp_path / "no-such-run"
    _one_line_error(["--checkpoint", str(missing), "--corpus", str(npz_corpus), "--out", str(tmp_path / "o")],
                    capsys, str(missing), "no such folder")
    (tmp_path / "empty-run").mkdir()
    _one_line_error(["--checkpoint", str(tmp_path / "empty-run"), "--corpus", str(npz_corpus)],
                    capsys, str(tmp_path / "empty-run"), "no stage-1 checkpoint")
    stage2 = _fake_checkpoint(tmp_path / "run" / "stage2" / "checkpoint_000000", stage="stage2")
    _one_line_error(["--checkpoint", str(stage2), "--corpus", str(npz_corpus)], capsys, "stage2 checkpoint")
    assert not (tmp_path / "o").exists()


def test_the_model_comes_from_the_checkpoint_and_a_frame_size_mismatch_is_pretrainings_error(
        tmp_path, npz_corpus, capsys):
    ckpt = _fake_checkpoint(tmp_path / "run" / "stage1" / "checkpoint_000002", frame_size=32)
    err = _one_line_error(["--checkpoint", str(tmp_path / "run"), "--corpus", str(npz_corpus),
                           "--out", str(tmp_path / "o")], capsys,
                          "frames are (64, 64, 3) (H, W, C) but the model expects (32, 32, 3)", str(ckpt))
    assert err.startswith(f"error: lapo-npz:{npz_corpus}: ")
    _one_line_error(["--checkpoint", str(ckpt), "--corpus", str(tmp_path / "nothing")], capsys, "nothing")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- with Ray: a trained checkpoint


@pytest.fixture(scope="module")
def trained(pretrained_run):
    """The shared pretraining run's folder (conftest.pretrained_run): a real stage 1 of 4 steps on
    an npz corpus."""
    return pretrained_run["out"]


def _read(out: Path):
    import pandas as pd
    import ray.data

    ds = ray.data.read_parquet(str(out / "latents"))  # Ray Data reads the .parquet files of the folder
    batch = ds.take_batch(ds.count(), batch_format="numpy")
    # pandas (pyarrow) reads a list of shards: the folder also holds manifest.json and labelling.json.
    frame = pd.concat([pd.read_parquet(p, columns=["episode_id", "step", "latent", "codes"])
                       for p in _shards(out).values()])
    return batch, frame


@pytest.mark.slow
def test_label_a_video_folder_and_an_npz_corpus(trained, tmp_path, capsys, ray_local):
    from lapo_ray.data.sources import open_source
    from lapo_ray.train.checkpoint import Checkpoint, load_dynamics

    ckpt = Checkpoint.latest(str(trained / "stage1")).uri
    model = load_dynamics(ckpt)
    c = model.cfg
    job = _job()
    videos = _videos(tmp_path / "videos", [40, 55, 70])
    npz = tmp_path / "npz"
    write_lapo_npz(npz, n_files=2, n=130, seed=3)
    # The videos are read and their labels written through file:// URIs, the npz corpus by paths;
    # the npz run reads its checkpoint through a URI.
    for corpus, checkpoint, uri in ((videos, str(trained), "file://"), (npz, f"file://{ckpt}", "")):
        out = tmp_path / f"out-{corpus.name}"
        assert job.main(["--checkpoint", checkpoint, "--corpus", f"{uri}{corpus}", "--out", f"{uri}{out}",
                         "--label.batch-size", "32"]) == 0
        printed = capsys.readouterr().out
        assert "labelling: " in printed and "steps/s" in printed and "ETA" in printed, printed
        scan = open_source(str(corpus)).scan()
        manifest = json.loads((out / "latents" / "manifest.json").read_text())
        assert manifest["rows"] == scan.triplets and manifest["shards"] == len(scan.files)
        assert sorted(_shards(out)) == sorted(f"{os.path.basename(f)}.parquet" for f in scan.files)
        batch, frame = _read(out)
        n = scan.triplets
        assert {"episode_id", "step", "latent", "codes", "obs"} <= set(batch)
        assert len(frame) == n and np.stack(frame["latent"]).shape == (n, c.latent_dim)
        assert batch["latent"].shape == (n, c.latent_dim) and batch["latent"].dtype == np.float32
        assert batch["codes"].shape == (n, c.vq.num_codebooks * c.vq.num_discrete_latents)
        assert batch["obs"].shape == (n, c.frame_size, c.frame_size, c.channels)
        assert len({(e, s) for e, s in zip(batch["episode_id"], batch["step"])}) == n  # each centre once
        assert len(np.unique(batch["episode_id"])) == scan.episodes
        # The labels are the IDM's: re-encode triplets rebuilt from the stored centre frames.
        order = np.lexsort((batch["step"], batch["episode_id"]))
        e, s, obs = batch["episode_id"][order], batch["step"][order], batch["obs"][order]
        inner = np.flatnonzero((e[:-2] == e[2:]) & (s[2:] - s[:-2] == 2))[:16] + 1
        frames = np.stack([obs[inner - 1], obs[inner], obs[inner + 1]], axis=1)
        with torch.no_grad():
            latent, codes = model.encode(torch.from_numpy(frames))
        np.testing.assert_allclose(batch["latent"][order][inner], latent.numpy(), atol=1e-4)
        assert (batch["codes"][order][inner] == codes.reshape(len(inner), -1).numpy()).mean() > 0.95
        job_file = json.loads((out / "label_job.json").read_text())
        assert job_file["checkpoint"] == (ckpt if corpus is videos else f"file://{ckpt}")
        # Asked again: nothing is relabelled.
        before = {k: p.stat().st_mtime_ns for k, p in _shards(out).items()}
        assert job.main(["--checkpoint", checkpoint, "--corpus", f"{uri}{corpus}", "--out", f"{uri}{out}"]) == 0
        assert {k: p.stat().st_mtime_ns for k, p in _shards(out).items()} == before

    # A bad file: pretraining's one-line error, and --data.on-bad-files skip labels the rest.
    (videos / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out-bad"
    capsys.readouterr()
    _one_line_error(["--checkpoint", str(trained), "--corpus", str(videos), "--out", str(out)], capsys,
                    "broken.mp4")
    assert job.main(["--checkpoint", str(trained), "--corpus", str(videos), "--out", str(out),
                     "--data.on-bad-files", "skip"]) == 0
    assert "broken.mp4" in capsys.readouterr().out
    assert json.loads((out / "latents" / "manifest.json").read_text())["rows"] == 38 + 53 + 68
    assert "broken.mp4.parquet" not in _shards(out)


@pytest.mark.slow
def test_a_killed_job_resumes_without_rewriting_finished_shards(trained, tmp_path, ray_local):
    videos = _videos(tmp_path / "videos", [120] * 10)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(trained), "--corpus", str(videos), "--out", str(out),
            "--label.num-actors", "1", "--label.batch-size", "16"]
    # The job joins this test's Ray instance, so killing its driver leaves no Ray processes behind.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "label.py"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not _shards(out):
            assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log = proc.stdout.read().decode()
    time.sleep(3)  # the dead driver's actor ends with it; a shard it was writing stays a hidden temp file
    kept = {name: (p.stat().st_mtime_ns, _hash(p)) for name, p in _shards(out).items()}
    assert 1 <= len(kept) < 10, (sorted(kept), log[-3000:])
    assert not (out / "latents" / "manifest.json").exists()

    manifest = __import__("lapo_ray.pipelines.label", fromlist=["run_label"]).run_label(
        _job().parse_args(argv)[0])
    assert manifest["shards_kept_from_earlier_run"] == len(kept)
    assert manifest["rows"] == 10 * 118 and manifest["shards"] == 10
    shards = _shards(out)
    assert len(shards) == 10 and not list((out / "latents").glob(".*tmp-*"))
    assert {name: (shards[name].stat().st_mtime_ns, _hash(shards[name])) for name in kept} == kept
    # A kept shard and a resumed one each hold the IDM's latents of their own file's triplet centres.
    import pyarrow.parquet as pq

    from lapo_ray.data.sources import open_source
    from lapo_ray.data.triplets import iter_segments
    from lapo_ray.train.labelling import shard_name

    src = open_source(str(videos))
    model = load_run(str(trained)).dynamics
    files = {shard_name(src, f): f for f in src.scan_files()}
    for name in (min(kept), min(set(shards) - set(kept))):
        (video,) = [seg.frames for table in src.file_segments(files[name])
                    for seg in iter_segments(table, (64, 64, 3))]
        triplets = np.stack([video[:-2], video[1:-1], video[2:]], axis=1)  # centres 1 .. n-2, in order
        with torch.no_grad():
            want = model.encode(torch.from_numpy(triplets))[0].numpy()
        table = pq.read_table(shards[name])
        order = np.argsort(table.column("step").to_numpy())
        got = np.stack(table.column("latent").to_numpy(zero_copy_only=False))[order]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without CUDA")
def test_an_actor_given_gpus_without_cuda_says_so():
    from lapo_ray.train.labelling import IDMLabeller

    with pytest.raises(RuntimeError, match="num-gpus-per-actor.*no CUDA device"):
        IDMLabeller("unused", None, "unused", use_gpu=True)
