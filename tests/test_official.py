"""The official LAPO layout written and read back (data.official, sources.LapoGameSource), and the
probe of latents that come from outside lapo_ray (evaluation.references.probe_figures): what the
fidelity study (docs/results/fidelity.py) stands on. No official checkout is needed here."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lapo_ray import UsageError
from lapo_ray.config import ProbeConfig
from lapo_ray.data.official import EXPORT_RECORD, export_official, source_episodes
from lapo_ray.data.sources import LapoGameSource, LapoNpzSource, ScanReport, open_source
from lapo_ray.data.splits import SplitSpec
from lapo_ray.evaluation.references import probe_figures
from test_jobs import load_script

OBS = (64, 64, 3)


def write_episodes(folder: str, lengths_per_file: list[list[int]], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """npz chunks holding whole episodes of the given lengths; every frame's first pixel says
    (file, frame) so frames can be traced after the export cuts them into other chunks."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    files = []
    for k, lengths in enumerate(lengths_per_file):
        n = sum(lengths)
        obs = rng.integers(0, 255, (n, *OBS), dtype=np.uint8)
        obs[:, 0, 0, 0], obs[:, 0, 0, 1] = k, np.arange(n) % 256
        done = np.zeros(n, bool)
        done[np.cumsum(lengths)[:-1]] = True
        arrays = {"obs": obs, "ta": rng.integers(0, 15, n), "done": done,
                  "rewards": rng.random(n).astype(np.float32), "ep_returns": np.zeros(n, np.float32),
                  "values": np.zeros(n, np.float32)}
        np.savez(os.path.join(folder, f"{k}.npz"), **arrays)
        files.append(arrays)
    return files


def scan_of(source) -> ScanReport:
    """The scan's episode ids, read without Ray (what ``Source.split`` needs)."""
    ids = [ep.episode_id for path in source.scan_files()
           for ep in source.read_episodes(path, source.file_index[path])]
    return ScanReport(files=source.scan_files(), frames=0, episodes=len(ids), triplets=0, episode_ids=ids)


def chunk(folder: str, split: str, i: int) -> dict[str, np.ndarray]:
    with np.load(os.path.join(folder, split, f"{i}.npz")) as f:
        return {k: f[k] for k in f.files}


def test_an_export_reads_back_frame_for_frame_with_validation_episodes_as_test(tmp_path):
    src_dir = str(tmp_path / "src")
    write_episodes(src_dir, [[40, 30, 50, 25], [60, 45, 35]])
    source = LapoNpzSource(src_dir)
    episodes = list(source_episodes(source))
    assert [len(e) for e in episodes] == [40, 30, 50, 25, 60, 45, 35]
    spec = SplitSpec(0.0, 0, val_episodes=(episodes[1].episode_id, episodes[5].episode_id))
    record = export_official(source, str(tmp_path / "out"), "coinrun", spec, train_chunk=64, test_chunk=16)

    game = str(tmp_path / "out" / "coinrun")
    train = [e for e in episodes if not spec.is_val(np.array([e.episode_id]))[0]]
    test = [e for e in episodes if spec.is_val(np.array([e.episode_id]))[0]]
    for split, eps, size in (("train", train, 64), ("test", test, 16)):
        frames = np.concatenate([e.frames for e in eps])
        actions = np.concatenate([e.actions for e in eps])
        starts = np.zeros(len(frames), bool)
        starts[np.cumsum([0] + [len(e) for e in eps[:-1]])] = True
        n = record[split]["chunks"]
        assert n == len(frames) // size and record[split]["frames_left_out"] == len(frames) % size
        chunks = [chunk(game, split, i) for i in range(n)]
        # The official loader asserts every chunk's length and reads these six arrays.
        for c in chunks:
            assert {k: len(v) for k, v in c.items()} == dict.fromkeys(
                ("obs", "ta", "done", "rewards", "ep_returns", "values"), size)
            assert c["obs"].dtype == np.uint8 and c["obs"].shape[1:] == OBS
        got = {k: np.concatenate([c[k] for c in chunks]) for k in ("obs", "ta", "done")}
        np.testing.assert_array_equal(got["obs"], frames[: n * size])
        np.testing.assert_array_equal(got["ta"], actions[: n * size])
        np.testing.assert_array_equal(got["done"], starts[: n * size])

    # Read back as lapo_ray reads one game's folder: test/ is the validation split.
    back = open_source(game)
    assert isinstance(back, LapoGameSource)
    assert [os.path.basename(os.path.dirname(p)) for p in back.scan_files()] == (
        ["train"] * record["train"]["chunks"] + ["test"] * record["test"]["chunks"])
    assert (record["train"]["chunks"], record["test"]["chunks"]) == (250 // 64, 75 // 16)
    scan = scan_of(back)
    val = set(back.split(scan, 0.05, 0).val_episodes)
    test_files = {back.file_index[p] for p in back.scan_files() if "/test/" in p}
    assert val == {e for e in scan.episode_ids if e >> 24 in test_files} and val
    # Every frame lapo_ray holds out is a frame of an episode the source held out, and no other.
    def tags(frames):
        return {(int(f[0, 0, 0]), int(f[0, 0, 1])) for f in frames}

    back_eps = list(source_episodes(back))
    held = tags(np.concatenate([e.frames for e in back_eps if e.episode_id in val]))
    trained = tags(np.concatenate([e.frames for e in back_eps if e.episode_id not in val]))
    assert held <= tags(np.concatenate([e.frames for e in test])) and not held & trained
    assert os.path.exists(os.path.join(game, EXPORT_RECORD))
    # Both splits number their chunks from 0; labelled shards are named after the split too.
    from lapo_ray.train.labelling import shard_name

    names = [shard_name(back, p) for p in back.scan_files()]
    assert len(set(names)) == len(names) and names[0] == "train-0.npz.parquet" and "test-0.npz.parquet" in names
    # Read beside another source, each file keeps its source's name and gets the source's index.
    from lapo_ray.data.mixture import MultiSource

    both = MultiSource([back, source])
    names = [shard_name(both, p) for p in both.scan_files()]
    assert len(set(names)) == len(names) and names[0] == "train-0.npz#0.parquet" and names[-1] == "1.npz#1.parquet"


def test_an_export_never_leaves_a_half_written_game_folder(tmp_path):
    src_dir = str(tmp_path / "src")
    write_episodes(src_dir, [[40, 30]])
    source = LapoNpzSource(src_dir)
    ids = [e.episode_id for e in source_episodes(source)]
    with pytest.raises(UsageError, match="too few frames for one chunk of test"):
        export_official(source, str(tmp_path / "out"), "ninja", SplitSpec(0.0, 0, ()), train_chunk=16, test_chunk=16)
    assert os.listdir(tmp_path / "out") == []
    export_official(source, str(tmp_path / "out"), "ninja", SplitSpec(0.0, 0, (ids[1],)), train_chunk=16,
                    test_chunk=16)
    with pytest.raises(UsageError, match="exists already"):
        export_official(source, str(tmp_path / "out"), "ninja", SplitSpec(0.0, 0, (ids[1],)))
    assert sorted(os.listdir(tmp_path / "out")) == ["ninja"]


def test_a_split_folder_alone_still_reads_as_one_split(tmp_path):
    write_episodes(str(tmp_path / "g" / "train"), [[40]])
    assert type(open_source(str(tmp_path / "g" / "train"))) is LapoNpzSource
    # Without test/ the game folder is not one corpus: the error names the folder that is.
    with pytest.raises(UsageError, match="train"):
        open_source(str(tmp_path / "g"))


def test_the_probe_measures_latents_from_outside_against_lapo_rays_floor_and_ceiling():
    rng = np.random.default_rng(0)
    episodes = np.repeat(np.arange(40), 30)
    actions = rng.integers(0, 4, len(episodes))
    onehot = np.eye(4, dtype=np.float32)[actions]
    noise = rng.normal(size=(len(episodes), 8)).astype(np.float32)
    outside = np.concatenate([onehot[:, :2], noise[:, :2]], 1)  # tells 2 of the 4 actions apart
    enc = {"action": actions, "episode_id": episodes, "trained/latent": outside,
           "untrained/latent": noise, "supervised/latent": onehot + 0.1 * noise[:, :4],
           "trained/codes": (outside[:, :2] > 0.5).astype(np.int64)[:, None, :]}
    cfg = ProbeConfig(max_epochs=60, patience=10)
    report = probe_figures(enc, cfg, ("trained",))
    assert report["ceiling_supervised_idm"] > 0.95
    assert report["floor_untrained_idm"] < 0.4
    # Actions 0 and 1 are told apart and 2 and 3 are not: 1/2 + 1/4 right, 2/3 of the way up.
    assert report["probe_acc"] == pytest.approx(0.75, abs=0.05)
    assert report["gap_closed"] == pytest.approx(2 / 3, abs=0.08)
    # The code says 1.5 of the action's 2 bits.
    assert report["nmi_trained"] == pytest.approx(0.75, abs=0.1)
    # The floor and ceiling fitted once serve any number of outside latents.
    again = probe_figures({k: v for k, v in enc.items() if not k.startswith(("untrained", "supervised"))}, cfg,
                          ("trained",), fitted={"untrained": _acc(report, "floor_untrained_idm"),
                                                "supervised": _acc(report, "ceiling_supervised_idm")})
    assert again["gap_closed"] == pytest.approx(report["gap_closed"])


def _acc(report, key):
    return {"probe_acc": report[key], "best_epoch": 0, "epochs_run": 0, "n_train": report["n_train"],
            "n_val": report["n_val"], "n_test": report["n_test"]}


def matched_model():
    from lapo_ray.config.models import IDMConfig, ModelConfig, PolicyConfig, VQConfig, WorldModelConfig

    return ModelConfig(idm=IDMConfig(impala_scale=1, impala_channels=(16, 32, 32)),
                       wm=WorldModelConfig(base_channels=8, norm="batch"),
                       vq=VQConfig(num_codebooks=2, num_discrete_latents=2, emb_dim=8, num_embs=16),
                       policy=PolicyConfig(impala_scale=1, impala_channels=(16, 32, 32)))


def test_lapo_ray_weights_take_the_official_names_and_shapes():
    import torch

    from lapo_ray.benchmarks.official import dynamics_to_official, policy_to_official
    from lapo_ray.models import LatentDynamics, LatentPolicy

    cfg = matched_model()
    dynamics = LatentDynamics(cfg)
    idm, wm = dynamics_to_official(dynamics.state_dict())
    # What the official IDM(vq, (9, 64, 64), 32, 1), WorldModel(32, 6, 3, base_size=8) and
    # Policy((3, 64, 64), 32, 1) hold, read from schmidtdominik/LAPO at c3844f7 on 2026-12-07.
    assert (len(idm), len(wm)) == (37, 131)
    want = {"conv_stack.0.res_block1.conv0.weight": (16, 16, 3, 3), "vq.embedding": (2, 16, 8),
            "vq.ema_count": (2, 16), "vq.ema_weight": (2, 16, 8), "policy_head.weight": (32, 256)}
    assert {k: tuple(idm[k].shape) for k in want} == want
    want = {"down.5.weight": (256, 128, 2, 2), "up.0.conv.weight": (288, 128, 2, 2),
            "final_conv.1.res_block.3.weight": (8, 4, 3, 3), "down.0.norm.running_var": (8,)}
    assert {k: tuple(wm[k].shape) for k in want} == want
    # Renamed, never changed: every tensor is the model's own.
    assert sum(v.numel() for v in [*idm.values(), *wm.values()]) == sum(v.numel() for v in dynamics.state_dict().values())
    policy = LatentPolicy(cfg.policy, cfg.latent_dim, 3, 64)
    value_head = {"weight": torch.zeros(1, 256), "bias": torch.zeros(1)}
    official_policy = policy_to_official(policy.state_dict(), value_head)
    assert len(official_policy) == 36 and official_policy["value_head.weight"].shape == (1, 256)
    assert torch.equal(official_policy["policy_head.weight"], policy.state_dict()["head.weight"])
    with pytest.raises(UsageError, match="action_head.weight: no official counterpart"):
        dynamics_to_official(LatentDynamics(cfg, num_actions=15).state_dict())


def fidelity_study():
    return load_script("docs/results/fidelity.py")


def test_the_official_episode_log_becomes_the_same_curve_as_rllibs_window():
    study = fidelity_study()
    # Episodes finished at these env steps with these returns; the curve is read every 4 steps.
    steps, returns = [1, 2, 3, 5, 9, 10, 11], [0.0, 10.0, 10.0, 0.0, 10.0, 10.0, 10.0]
    assert study.window_curve(steps, returns, every=4, window=2) == [(4, 10.0), (8, 5.0), (12, 10.0)]
    # Every episode so far while fewer than the window have finished; nothing before the first.
    assert study.window_curve([6, 7], [3.0, 5.0], every=4, window=20) == [(8, 4.0)]


def test_stage3_records_from_another_latent_policy_are_not_read(tmp_path):
    import json

    study = fidelity_study()
    study.RECORDS = str(tmp_path)
    start = tmp_path / "stage3" / "start"
    for stage in ("stage1", "stage2"):
        (start / stage / "checkpoint_0").mkdir(parents=True)
        (start / stage / "checkpoint_0" / "model.pt").write_bytes(stage.encode())
    sha = study.start_hash(str(start))
    for name, by in (("official-s0", sha), ("official-s1", "an earlier start"), ("lapo_ray-1runner-s0", sha)):
        (tmp_path / "stage3" / f"{name}.json").write_text(json.dumps({"curve": [], "start": by}))
    assert sorted(study.stage3_records()) == [("lapo_ray-1runner", 0), ("official", 0)]
    # A changed weight is another start: nothing recorded from the first one is read.
    (start / "stage2" / "checkpoint_0" / "model.pt").write_bytes(b"retrained")
    assert study.start_hash(str(start)) != sha and study.stage3_records() == {}
