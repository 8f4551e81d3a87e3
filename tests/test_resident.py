"""The corpus held on the training device (data.resident, --data.device-resident): one epoch is the
streaming path's triplets, for one corpus and for two weighted ones; a corpus that does not fit is
refused in one line naming the sizes."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch
from test_multi_corpus import EPISODES, LENGTH, MARK, SHAPE, write_game

from lapo_ray import UsageError
from lapo_ray.config import PipelineConfig
from lapo_ray.data.mixture import SOURCE_BITS, MultiSource
from lapo_ray.data.resident import (
    check_fits,
    estimate_split_bytes,
    hold,
    load_resident,
    split_segments,
    worker_device_memory,
)
from lapo_ray.data.sources import CorpusSource
from lapo_ray.data.splits import SplitSpec
from lapo_ray.data.triplets import TripletBatcher

PIPE = PipelineConfig(val_fraction=0.2, local_shuffle_buffer=64)


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    return (write_game(str(tmp_path_factory.mktemp("coinrun")), 0, "coinrun"),
            write_game(str(tmp_path_factory.mktemp("bigfish")), 1, "bigfish"))


def opened(games, which: str):
    """(source, scan, split) of one corpus ("one") or of both weighted 0.25/0.75 ("two")."""
    src = (CorpusSource(games[0]) if which == "one" else
           MultiSource([CorpusSource(g) for g in games], (0.25, 0.75), labels=list(games)))
    scan = src.scan()
    return src, scan, src.split(scan, PIPE.val_fraction, PIPE.split_seed)


def keyed(batches) -> Counter:
    """The multiset of (episode_id, step, action, frame bytes) of a stream of batches."""
    out = Counter()
    for b in batches:
        b = {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
        out.update((int(e), int(s), int(a), f.tobytes())
                   for e, s, a, f in zip(b["episode_id"], b["step"], b["action"], b["frames"]))
    return out


def check_triplets_are_whole(batches) -> None:
    """Frames encode (source, episode, step) in pixels: each triplet is three frames in a row of
    its own episode of one source."""
    for b in batches:
        f = b["frames"].cpu().numpy().astype(int)
        steps = f[:, :, 0, 0, 0] + 256 * f[:, :, 0, 0, 1]
        assert (steps == b["step"].cpu().numpy()[:, None] + np.array([-1, 0, 1])).all()
        assert (f[:, :, 0, 0, 2] == (b["episode_id"].cpu().numpy() & 0xFF)[:, None]).all()
        source = b["episode_id"].cpu().numpy() >> SOURCE_BITS
        assert (f[:, :, 0, 1, 0] == np.array([MARK[0], MARK[1]])[source][:, None]).all()


@pytest.mark.parametrize("which", ["one", "two"])
def test_an_epoch_held_on_the_device_is_the_streaming_epochs_triplets(games, which):
    src, scan, spec = opened(games, which)
    # The streaming consumer's cut (TripletBatcher, with its shuffle buffer) of the segments the
    # stream reads: the split's files in the stream's order, a weighted source's repeats included.
    streamed = keyed(TripletBatcher(SHAPE, 32, PIPE.local_shuffle_buffer, seed=0).batches(
        split_segments(src, "train", PIPE, scan.files, spec, weighted=True)))
    resident = load_resident(src, "train", PIPE, scan.files, spec, "cpu", weighted=True)
    epoch = list(resident.batches(32, seed=5))
    assert keyed(epoch) == streamed
    check_triplets_are_whole(epoch)
    assert not spec.is_val(resident.episode_id.numpy()).any()
    if which == "two":
        # The second source (weight 0.75, as large as the first) is read three times over, and held once.
        per_source = Counter((k[0] >> SOURCE_BITS) for k in streamed.elements())
        assert per_source == {0: 380, 1: 3 * 380}
        assert resident.distinct_triplets == 2 * 380 and len(resident) == 4 * 380
        assert len(resident.frames) < 2 * (EPISODES - 2) * LENGTH * 1.2


def test_epochs_are_seeded_permutations_and_drop_last_drops_the_rest(games):
    src, scan, spec = opened(games, "one")
    resident = load_resident(src, "train", PIPE, scan.files, spec, "cpu")
    def order(seed):
        return torch.cat([b["step"] * 10**6 + b["episode_id"] for b in resident.batches(50, seed)])

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == sorted(order(2).tolist())
    sizes = [len(b["step"]) for b in resident.batches(50, seed=0, drop_last=True)]
    assert sizes == [50] * (380 // 50)
    # Unshuffled: the triplets in source order, as the streaming batcher emits them without a buffer.
    plain = keyed(TripletBatcher(SHAPE, 50).batches(split_segments(src, "train", dataclasses.replace(
        PIPE, global_shuffle="none"), scan.files, spec)))
    in_order = load_resident(src, "train", dataclasses.replace(PIPE, global_shuffle="none"), scan.files, spec, "cpu")
    assert keyed(in_order.batches(50, seed=None)) == plain


def test_the_devices_gather_is_the_hosts():
    from lapo_ray.data.resident import gather_rows

    frames = torch.randint(0, 256, (50, 4, 4, 3), dtype=torch.uint8)
    rows = torch.tensor([[0, 1, 2], [47, 48, 49], [10, 12, 14]])
    assert torch.equal(gather_rows(frames, rows), torch.from_numpy(frames.numpy()[rows.numpy()]))


def test_the_frame_offset_and_short_segments_follow_the_streaming_batcher(games):
    src, scan, spec = opened(games, "one")
    segments = list(split_segments(src, "train", PIPE, scan.files, spec))
    resident = hold(segments, SHAPE, "cpu", offset=3)
    streamed = keyed(TripletBatcher(SHAPE, 16, offset=3).batches(segments))
    assert keyed(resident.batches(16, seed=0)) == streamed and len(resident) == sum(streamed.values())
    assert len(hold([], SHAPE, "cpu")) == 0


def test_a_stage_task_takes_the_held_corpus_as_its_input(games):
    from lapo_ray.config import PRETRAIN_PRESETS
    from lapo_ray.train.stages import Stage1Task, SupervisedIDMTask

    src, scan, spec = opened(games, "one")
    resident = load_resident(src, "train", PIPE, scan.files, spec, "cpu")
    model = PRETRAIN_PRESETS["cpu"]().model
    for task in (Stage1Task(model), SupervisedIDMTask(model)):
        got = list(task.batches(resident, 64, PIPE, True, 2))
        want = list(resident.batches(64, seed=PIPE.shuffle_seed + 2, drop_last=True))
        assert [b["step"].tolist() for b in got] == [b["step"].tolist() for b in want]
        assert hasattr(task, "hold_on_device")


def test_the_estimate_is_close_to_what_is_held(games):
    src, scan, spec = opened(games, "two")
    resident = load_resident(src, "train", PIPE, scan.files, spec, "cpu", weighted=True)
    estimate = estimate_split_bytes(scan, spec, "train", SHAPE, segment_frames=16)
    assert abs(estimate - resident.nbytes) / resident.nbytes < 0.15, (estimate, resident.nbytes)
    assert worker_device_memory(use_gpu=False)[1] > 0  # this process's host, Ray not running


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_a_corpus_that_does_not_fit_is_refused_in_one_line_naming_the_sizes():
    check_fits(2 * 2**30, "NVIDIA H100 80GB HBM3", 79 * 2**30, 8 * 2**30)  # fits
    with pytest.raises(UsageError) as e:
        check_fits(98 * 2**30, "NVIDIA H100 80GB HBM3", int(79.2 * 2**30), 8 * 2**30)
    assert one_line(e) == (
        "--data.device-resident: the training split needs about 98.0 GiB on each worker's device, but NVIDIA H100 "
        "80GB HBM3 has 79.2 GiB free, 8.0 GiB of it kept for the model (--data.resident-margin-gb), so at most "
        "71.2 GiB for the corpus; train on more GPUs (--stage1.num-workers), use a smaller corpus, or stream it "
        "(--data.device-resident false)")


def test_the_fit_check_refuses_a_split_its_gpus_cannot_hold(games, monkeypatch):
    from lapo_ray.config import PRETRAIN_PRESETS
    from lapo_ray.train import stage1

    src, scan, spec = opened(games, "one")
    cfg = PRETRAIN_PRESETS["paper"]()
    cfg.stage1.use_gpu, cfg.stage1.num_workers = True, 2
    cfg.data.device_resident, cfg.data.resident_margin_gb = True, 0.0
    need = estimate_split_bytes(scan, spec, "train", SHAPE)
    asked = []
    monkeypatch.setattr(stage1, "worker_device_memory", lambda use_gpu: asked.append(use_gpu) or ("GPU-X", need // 4))
    with pytest.raises(UsageError) as e:
        stage1.check_device_resident(cfg, src, scan, spec)
    assert asked == [True]
    assert one_line(e).startswith(f"--data.device-resident: the training split ({need / 2**30:.1f} GiB over 2 GPU "
                                  "workers) needs about 0.0 GiB on each worker's device, but GPU-X has 0.0 GiB free")
    monkeypatch.setattr(stage1, "worker_device_memory", lambda use_gpu: ("GPU-X", need))
    stage1.check_device_resident(cfg, src, scan, spec)  # half of it each: fits
    cfg.data.device_resident = False
    monkeypatch.setattr(stage1, "worker_device_memory", lambda use_gpu: pytest.fail("asked without the flag"))
    stage1.check_device_resident(cfg, src, scan, spec)


def test_a_pretraining_run_refused_for_its_size_writes_nothing(games, tmp_path, monkeypatch):
    # Refused with the rest of the input, before the run folder exists: no config.json is left
    # behind that a rerun without the flag would have to override.
    from lapo_ray.config import PRETRAIN_PRESETS
    from lapo_ray.pipelines import pretrain
    from lapo_ray.train import stage1

    cfg = PRETRAIN_PRESETS["cpu"]()
    cfg.corpus, cfg.out, cfg.model.frame_size = games[0], str(tmp_path / "run"), SHAPE[0]
    cfg.data.device_resident, cfg.data.resident_margin_gb = True, 0.0
    monkeypatch.setattr(pretrain, "init_ray", lambda: None)  # the check needs no cluster here
    monkeypatch.setattr(stage1, "worker_device_memory", lambda use_gpu: ("CPU-X", 1024))
    with pytest.raises(UsageError) as e:
        pretrain.run_pretrain(cfg)
    assert one_line(e).startswith("--data.device-resident: the training split (held by this node's CPU workers")
    assert not (tmp_path / "run").exists()
