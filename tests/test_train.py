"""Stages 1 and 2 on Ray Train: codebook synchronisation, metrics, resume (a worker lost with its node: test_multinode.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pytest
import torch

from lapo_ray.config import PRETRAIN_PRESETS, PipelineConfig, WandbConfig
from lapo_ray.data.corpus import Episode, write_corpus
from lapo_ray.data.sources import CorpusSource
from lapo_ray.data.triplets import SplitSpec, iter_batches, triplet_dataset
from lapo_ray.models import LatentDynamics
from lapo_ray.train.checkpoint import Checkpoint
from lapo_ray.train.metrics import MetricsSink, read_metrics
from lapo_ray.train.stages import Stage1Task
from lapo_ray.train.trainer import fit_stage


def square_episode(eid: int, length: int, rng) -> Episode:
    """A square moved by a random action each step: a tiny world with visible actions."""
    frames = np.full((length, 64, 64, 3), 30, np.uint8)
    moves = {0: (0, -4), 1: (0, 4), 2: (-4, 0), 3: (4, 0), 4: (0, 0)}
    actions = rng.integers(0, 5, length)
    y, x = 24, 24
    for t in range(length):
        frames[t, y : y + 12, x : x + 12] = (220, 180, 40)
        dy, dx = moves[int(actions[t])]
        y, x = int(np.clip(y + dy, 0, 52)), int(np.clip(x + dx, 0, 52))
    return Episode(eid, frames, actions=actions.astype(np.int64))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = str(tmp_path_factory.mktemp("corpus"))
    write_corpus(root, [square_episode(i, 60, rng) for i in range(24)], "coinrun", shard_frames=300)
    return root


def tiny_config(out: str, **stage1):
    cfg = PRETRAIN_PRESETS["cpu"]()
    stage = dataclasses.replace(cfg.stage1, **{"batch_size": 16, "steps": 6, "report_every": 3,
                                                "checkpoint_every": 3, "val_batches": 1,
                                                "precision": "fp32", **stage1})
    return dataclasses.replace(cfg, out=out, stage1=stage,
                               data=PipelineConfig(val_fraction=0.2, local_shuffle_buffer=0, global_shuffle="none"))


class RecordingStage1(Stage1Task):
    """Stage 1 that also records, per rank, the triplets of every step and the final codebook."""

    def __init__(self, model_cfg, record_dir):
        super().__init__(model_cfg)
        self.record_dir = record_dir

    def _rank(self):
        import ray.train

        return ray.train.get_context().get_world_rank()

    def loss(self, model, batch):
        with open(os.path.join(self.record_dir, f"batches-rank{self._rank()}.jsonl"), "a") as f:
            f.write(json.dumps(list(zip(batch["episode_id"].tolist(), batch["step"].tolist()))) + "\n")
        return super().loss(model, batch)

    def validate(self, model, batches):
        inner = model.module if hasattr(model, "module") else model
        torch.save({k: v.clone() for k, v in inner.state_dict().items()},
                   os.path.join(self.record_dir, f"state-rank{self._rank()}.pt"))
        return super().validate(model, batches)


def run_stage1(cfg, corpus, task=None, sink=None):
    src = CorpusSource(corpus)
    run_config = cfg.to_dict()
    return fit_stage(task or Stage1Task(cfg.model), cfg.stage1, cfg.data,
                     triplet_dataset(src, "train", cfg.data), triplet_dataset(src, "val", cfg.data),
                     cfg.out, run_config, sink)


# Each Ray Train run costs about 20 s of start-up here, so the runs below are made once per
# module and read by every test that needs one: a 2-worker run that records what each rank saw,
# and a 1-worker run stopped at step 3 and run again to step 6.


@pytest.fixture(scope="module")
def two_workers(corpus, tmp_path_factory, ray_local):
    """Six steps on 2 workers, recording each rank's triplets per step and its weights at each
    validation: (config, record folder, result)."""
    base = tmp_path_factory.mktemp("two-workers")
    cfg = tiny_config(str(base / "run"), num_workers=2, cpus_per_worker=0.5)
    record = base / "record"
    record.mkdir()
    return cfg, record, run_stage1(cfg, corpus, RecordingStage1(cfg.model, str(record)))


@pytest.fixture(scope="module")
def one_worker(corpus, tmp_path_factory, ray_local):
    """A 1-worker run to step 3, then the same command with 6 steps, into a relative output folder
    as `python jobs/pretrain.py` gives it (Ray's workers run in folders of their own, and rank 0's
    metrics must still land in this one): {"root", "cfg" (with the absolute folder), "first",
    "second"}."""
    root = tmp_path_factory.mktemp("one-worker")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = tiny_config("run", steps=6, checkpoint_every=3)
        sink = lambda: MetricsSink(cfg.out, "stage1", WandbConfig(mode="disabled"), {})  # noqa: E731
        first = run_stage1(dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, steps=3)), corpus,
                           sink=sink())
        second = run_stage1(cfg, corpus, sink=sink())
    finally:
        os.chdir(cwd)
    return {"root": root, "cfg": dataclasses.replace(cfg, out=str(root / "run")), "first": first, "second": second}


@pytest.mark.slow
def test_two_workers_hold_the_codebook_of_one_worker_on_the_global_batch(corpus, two_workers):
    cfg, record, result = two_workers
    assert result.error is None
    steps = cfg.stage1.steps
    ranks = [torch.load(record / f"state-rank{r}.pt") for r in (0, 1)]
    for key in ("idm.vq.embeddings", "idm.vq.ema_cluster_size", "idm.vq.ema_w"):
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")

    # One worker, the same initial weights, each step on the concatenation of both ranks' batches.
    per_rank = [[json.loads(line) for line in open(record / f"batches-rank{r}.jsonl")] for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == steps
    frames = {}
    for b in iter_batches(triplet_dataset(CorpusSource(corpus), "train", cfg.data), (64, 64, 3), 256, cfg.data):
        frames.update({(int(e), int(s)): f for e, s, f in zip(b["episode_id"], b["step"], b["frames"])})
    torch.manual_seed(cfg.stage1.seed)
    single = LatentDynamics(cfg.model).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(single.parameters(), lr=cfg.stage1.lr, weight_decay=cfg.stage1.weight_decay)
    from lapo_ray.train.loop import lr_factor

    for step in range(steps):
        keys = [tuple(k) for k in per_rank[0][step] + per_rank[1][step]]
        batch = torch.from_numpy(np.stack([frames[k] for k in keys]))
        for g in opt.param_groups:
            g["lr"] = cfg.stage1.lr * lr_factor(step, cfg.stage1)
        loss = single(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(single.parameters(), cfg.stage1.grad_clip)
        opt.step()
    ref = single.state_dict()
    for key in ("idm.vq.embeddings", "idm.vq.ema_cluster_size", "idm.vq.ema_w"):
        torch.testing.assert_close(ranks[0][key], ref[key], rtol=1e-4, atol=1e-5,
                                   msg=f"{key}: 2 workers differ from 1 worker on the global batch")
    # The EMA really moved: this is not a comparison of two untouched initial codebooks.
    torch.manual_seed(cfg.stage1.seed)
    init = LatentDynamics(cfg.model).state_dict()
    assert not torch.allclose(ref["idm.vq.ema_cluster_size"], init["idm.vq.ema_cluster_size"])


@pytest.mark.slow
def test_one_and_two_workers_report_the_same_metrics(two_workers, one_worker):
    names = {}
    for n, result in ((1, one_worker["second"]), (2, two_workers[2])):
        assert result.error is None
        assert result.metrics["step"] == 6 and result.metrics["world_size"] == n
        names[n] = set(result.metrics)
        for key in ("train/wm_loss", "val/wm_loss", "train/vq_perplexity_cb0", "train/vq_usage_cb1",
                    "samples_per_s", "samples_per_s_per_worker", "data_wait_frac"):
            assert key in result.metrics, key
            assert np.isfinite(result.metrics[key]), key
        assert 0.0 <= result.metrics["data_wait_frac"] <= 1.0
    assert names[1] == names[2]


@pytest.mark.slow
def test_rerun_resumes_from_the_latest_checkpoint(one_worker):
    first, second, run = one_worker["first"], one_worker["second"], one_worker["root"] / "run"
    assert first.metrics["step"] == 3
    assert second.metrics["resumed_from_step"] == 3
    assert second.metrics["step"] == 6
    ckpt = Checkpoint.latest(str(run / "stage1"))
    state = json.load(open(os.path.join(ckpt.uri, "state.json")))
    assert state["step"] == 6 and state["done"] is True
    assert (ckpt.step, ckpt.done, ckpt.model_config()) == (6, True, one_worker["cfg"].model)
    rows = read_metrics(str(run), "stage1")
    assert [r["step"] for r in rows][-1] == 6 and 3 in [r["step"] for r in rows]
    assert [r["resumed_from_step"] for r in rows if r["step"] > 3] == [3] * sum(r["step"] > 3 for r in rows)


@pytest.mark.slow
def test_a_stage_that_cannot_fit_the_cpus_fails_at_once_naming_the_flags(corpus, tmp_path, ray_local):
    """Two 1-CPU workers on a 2-CPU cluster leave Ray Data's reads nothing: Ray would hang; the
    stage refuses to start instead, before anything is written."""
    cfg = tiny_config(str(tmp_path / "run"), num_workers=2, cpus_per_worker=1.0)
    t0 = time.monotonic()
    with pytest.raises(ValueError) as err:
        run_stage1(cfg, corpus)
    assert time.monotonic() - t0 < 10
    assert str(err.value) == ("stage1: 2 x 1 CPUs plus 1 for Ray Data's reads is 3 CPUs, but the cluster has 2; "
                              "lower --stage1.num-workers or --stage1.cpus-per-worker, or add CPUs")
    assert not os.path.exists(tmp_path / "run")

    from lapo_ray.config import LabelConfig
    from lapo_ray.train.labelling import label_corpus

    with pytest.raises(ValueError, match=r"labelling: 2 x 1 CPUs plus 1 .* lower --label.num-actors"):
        label_corpus(CorpusSource(corpus), "unused", str(tmp_path / "run"), LabelConfig(num_actors=2))


def test_a_run_made_before_an_option_existed_continues_and_another_config_is_refused(tmp_path):
    """config.json written before --stage1.placement-strategy, --stage1.shard-locality and
    --data.block-mb existed: their defaults keep the old behaviour, so it is no change; a real
    change is still named."""
    from lapo_ray import storage
    from lapo_ray.pipelines.pretrain import check_artifact_folder

    cfg = tiny_config(str(tmp_path / "run"))
    old = cfg.to_dict()
    for section, key in (("stage1", "placement_strategy"), ("stage1", "shard_locality"), ("data", "block_mb")):
        del old[section][key]
    storage.write_json(str(tmp_path / "run" / "config.json"), old)
    check_artifact_folder(cfg)
    changed = dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, lr=0.5))
    with pytest.raises(ValueError, match=r"holds a run with another config \(stage1.lr: 0.001 -> 0.5\)"):
        check_artifact_folder(changed)


def test_a_checkpoint_reads_its_config_once_and_names_one_that_does_not_fit(tmp_path, monkeypatch):
    from lapo_ray import UsageError, storage
    from lapo_ray.train.checkpoint import save_checkpoint

    cfg = tiny_config(str(tmp_path / "run"))
    stage = tmp_path / "run" / "stage1"
    for name, step in (("checkpoint_000001", 6), ("checkpoint_000000", 3)):
        state = {"step": step, "done": False, "stage": "stage1"}
        save_checkpoint(str(stage / name), torch.nn.Linear(1, 1), None, state, cfg.to_dict())
    reads = []
    read_json = storage.read_json
    monkeypatch.setattr(storage, "read_json", lambda uri: reads.append(os.path.basename(uri)) or read_json(uri))
    ckpt = Checkpoint.latest(str(stage))
    assert ckpt.uri == str(stage / "checkpoint_000001")
    assert (ckpt.step, ckpt.done, ckpt.stage) == (6, False, "stage1")
    assert ckpt.model_config() == cfg.model and ckpt.model_config() == cfg.model
    assert reads == ["config.json"]  # state.json came with the listing; config.json is read once
    assert Checkpoint.finished(str(stage)) is None  # the run stopped before its end
    assert Checkpoint.latest(str(tmp_path / "run" / "stage2")) is None
    (stage / "checkpoint_000001" / "config.json").write_text('{"model": {"no_such_field": 1}}')
    with pytest.raises(UsageError, match=r"checkpoint_000001/config.json: its model config does not fit this version"):
        Checkpoint(str(stage / "checkpoint_000001")).model_config()


def test_fit_into_returns_the_stages_checkpoint_and_names_the_stage_that_failed(tmp_path, monkeypatch):
    import contextlib
    from types import SimpleNamespace

    from lapo_ray.train import trainer
    from lapo_ray.train.checkpoint import save_checkpoint
    from lapo_ray.train.stages import SupervisedIDMTask

    cfg = tiny_config(str(tmp_path))
    metrics = str(tmp_path / "ceiling" / "metrics.jsonl")
    sinks, followed = [], []

    def fit_stage(task, stage, pipe, train_ds, val_ds, out_uri, run_config, sink):
        sinks.append(sink.path)
        save_checkpoint(os.path.join(out_uri, task.name, "checkpoint_000000"), torch.nn.Linear(1, 1), None,
                        {"step": stage.steps, "done": True}, run_config)
        return SimpleNamespace(error=None)

    wandb = SimpleNamespace(following=lambda path: followed.append(path) or contextlib.nullcontext())
    monkeypatch.setattr(trainer, "fit_stage", fit_stage)
    ckpt = trainer.fit_into(str(tmp_path), SupervisedIDMTask(cfg.model), cfg.stage1, cfg.data, None, None,
                            cfg.to_dict(), wandb=wandb, metrics_path=metrics)
    assert (ckpt.uri, ckpt.step, ckpt.done) == (str(tmp_path / "ceiling" / "checkpoint_000000"), 6, True)
    assert sinks == followed == [metrics]
    monkeypatch.setattr(trainer, "fit_stage", lambda *args: SimpleNamespace(error=RuntimeError("worker died")))
    with pytest.raises(RuntimeError, match=r"^ceiling failed: worker died$"):
        trainer.fit_into(str(tmp_path), SupervisedIDMTask(cfg.model), cfg.stage1, cfg.data, None, None, {})


def test_stage1_reports_the_probe_it_is_given_on_its_idms_latents(tmp_path):
    import pickle

    from lapo_ray.evaluation.probe import ProbeSet, TrainingProbe, encode_in_batches, probe_accuracy, probe_halves

    cfg = tiny_config(str(tmp_path))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (64, 3, 64, 64, 3), dtype=np.uint8)
    actions, episodes = rng.integers(0, 3, 64), np.arange(64) // 8
    probe_cfg = dataclasses.replace(cfg.probe, hidden=(8,), max_epochs=3)
    task = Stage1Task(cfg.model, TrainingProbe(ProbeSet(frames, actions, probe_halves(episodes), episodes), probe_cfg))
    torch.manual_seed(0)
    model = task.build().eval()
    got = pickle.loads(pickle.dumps(task)).extra_metrics(model)  # as it travels to rank 0
    acc = probe_accuracy(encode_in_batches(lambda f: model.encode(f)[0], frames), actions, probe_halves(episodes),
                         probe_cfg, episode_ids=episodes)
    assert got == {"probe/acc": acc["probe_acc"], "probe/train_acc": acc["probe_train_acc"],
                   "probe/best_epoch": float(acc["best_epoch"])}
    assert Stage1Task(cfg.model).extra_metrics(model) == {}


@pytest.mark.slow
def test_stage1_labels_read_the_hashed_training_triplets_and_train_on_two_ranks(corpus, tmp_path, ray_local):
    from lapo_ray.train.recipes import action_label_fraction, triplet_hash_np
    from lapo_ray.train.stage1 import load_action_label_set, stage1_task

    cfg = tiny_config(str(tmp_path / "run"), num_workers=2, cpus_per_worker=0.5, steps=3, report_every=3,
                      action_labels=40, action_label_batch=8)
    src = CorpusSource(corpus)
    scan = src.scan()
    spec = SplitSpec.for_episodes(scan.episode_ids, cfg.data.val_fraction, cfg.data.split_seed)
    task = stage1_task(cfg, src, scan, spec, None)
    labels = task.action_label_set
    assert labels.seed == cfg.stage1.seed
    # Exactly the training triplets the hash marks, with their own frames and actions.
    every = {}
    for b in iter_batches(triplet_dataset(src, "train", cfg.data, scan.files, spec), (64, 64, 3), 256, cfg.data):
        for e, s, f, a in zip(b["episode_id"], b["step"], b["frames"], b["action"]):
            every[(int(e), int(s))] = (f, int(a))
    frac = action_label_fraction(40, int(scan.triplets * (1 - len(spec.val_episodes) / len(scan.episode_ids))))
    keys = np.array(list(every))
    marked = [tuple(k) for k in keys[triplet_hash_np(keys[:, 0], keys[:, 1]) < frac]]
    assert 20 < len(labels.actions) == len(marked) < 80
    assert sorted(labels.actions.tolist()) == sorted(every[k][1] for k in marked)
    marked_frames = {every[k][0].tobytes() for k in marked}
    assert all(f.tobytes() in marked_frames for f in labels.frames)
    # A second read gives the same set in the same order (the split and the hash fix it).
    again = load_action_label_set(src, cfg.data, scan.files, spec, frac)
    assert again.actions.tolist() == labels.actions.tolist() and np.array_equal(again.frames, labels.frames)

    # The set travels to both ranks; each step adds the labelled batch's loss.
    result = fit_stage(task, cfg.stage1, cfg.data, triplet_dataset(src, "train", cfg.data, scan.files, spec),
                       triplet_dataset(src, "val", cfg.data, scan.files, spec), cfg.out, cfg.to_dict())
    assert result.error is None and result.metrics["world_size"] == 2
    m = result.metrics
    assert 0.0 < m["train/label_loss"] < 10.0 and 0.0 <= m["train/label_acc"] <= 1.0
    assert m["train/loss"] > m["train/wm_loss"]
