"""The paper-scale stage 1 as one command without Ray (``jobs/benchmark.py paper``): its CPU smoke
run with Ray blocked names every figure a GPU run fills in; the demonstrator as a plain PyTorch
file (its network is the RLlib module's); the official LAPO step's loader; the training pieces
(timing leaves the weights at their start, compile failures fall back, the deadline stops)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from test_step import run_benchmark_job_without

from lapo_ray import MissingPathError, UsageError
from lapo_ray.benchmarks import official, paper_collect
from lapo_ray.benchmarks.paper_report import FIGURES, lookup
from lapo_ray.benchmarks.paper_train import Lockstep, guarded_step, make_trainee, time_alone
from lapo_ray.config import PRETRAIN_PRESETS, PaperBenchConfig, PolicyConfig
from lapo_ray.models.agent import AgentNet, agent_record, load_agent_file, save_agent_file

# A demonstrator network small enough that collecting a smoke corpus on 2 cores takes seconds.
CPU_POLICY = PolicyConfig(impala_scale=1, impala_channels=(4, 4, 4), impala_features=16)


def agent_file(path, latent_dim=None, seed=0) -> str:
    torch.manual_seed(seed)
    net = AgentNet(CPU_POLICY, 15, (64, 64, 3), latent_dim, (32,) if latent_dim else ())
    save_agent_file(agent_record(net.state_dict(), CPU_POLICY, 15, (64, 64, 3), latent_dim,
                                 (32,) if latent_dim else (), {"variant": "test"}), str(path))
    return str(path)


# --------------------------------------------------------------------------- the smoke run


def has_path(result: dict, path: str) -> bool:
    *sections, key = path.split(".")
    node = result
    for part in sections:
        node = node.get(part)
        if not isinstance(node, dict):
            return False
    return key in node


SMOKE = ["--preset", "cpu", "--device", "cpu", "--frames", "800", "--collect-workers", "1", "--envs-per-worker", "16",
         "--steps", "4", "--batch-size", "8", "--probe-every", "2", "--probe-triplets", "128", "--timing-steps", "1",
         "--warmup-steps", "1", "--time-limit-min", "20"]


@pytest.mark.slow
def test_the_smoke_run_without_ray_names_every_figure_the_gpu_run_fills(tmp_path):
    out = tmp_path / "paper"
    demonstrator = agent_file(tmp_path / "demonstrator.pt")
    # What the lent GPU machines lack: Ray, wandb and PyAV.
    r = run_benchmark_job_without(["paper", "--out", str(out), "--demonstrator", demonstrator, *SMOKE],
                                  ("ray", "wandb", "av"), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "paper_stage1.json").read_text())
    markdown = (out / "paper_stage1.md").read_text()
    missing = [p for p in FIGURES if not has_path(result, p)]
    assert not missing, f"figures the JSON lacks: {missing}"
    assert all(f"`{p}`" in markdown for p in FIGURES) and markdown in r.stdout
    assert result["status"] == "finished" and result["collection"]["policy"].startswith("demonstrator:")
    assert (result["collection"]["epsilon"], result["collection"]["noise_hold"]) == (0.25, 0.75)
    s1 = result["stage1"]
    assert (s1["steps_done"], s1["samples_done"], s1["stop_reason"], s1["compile_used"]) == (4, 32, "steps", False)
    assert s1["samples_per_s"] > 0 and s1["gflop_per_sample"] > 0 and s1["mfu"] is None  # no peak for a CPU
    assert result["ceiling"]["mode"] == "concurrent" and result["ceiling"]["steps_done"] == 4
    assert [p["step"] for p in result["probes"]] == [2, 4] and all(p["ceiling_step"] == p["step"]
                                                                  for p in result["probes"])
    for key in ("probe_acc", "floor_untrained_idm", "ceiling_supervised_idm", "info_bits_trained", "nmi_trained"):
        assert result["probe"][key] is not None, key
    assert result["official_lapo_step"]["timed"] is False and result["official_lapo_step"]["samples_per_s"] is None
    assert lookup(result, "official_lapo_step.why") == "no --official-lapo checkout given"
    assert any("torch.compile off" in n for n in result["notes"])


def test_without_a_demonstrator_the_corpus_is_sticky_random_play_and_says_so(tmp_path, monkeypatch, capsys):
    from lapo_ray.data.corpus import Manifest

    collected = []
    monkeypatch.setattr(paper_collect, "collect_local", lambda cfg, policy_factories: collected.append(cfg) or Manifest(
        "coinrun", (64, 64, 3), 10, 1, 1, 8, ["actions"], [], {"mean_episode_return": 1.5}))
    monkeypatch.setattr(paper_collect, "check_collection", lambda cfg: None)
    corpus, info = paper_collect.corpus_for(PaperBenchConfig(out=str(tmp_path), frames=1000, collect_workers=2))
    [cfg] = collected
    assert (cfg.policy, cfg.epsilon, cfg.noise_hold, cfg.num_workers, cfg.frames) == ("sticky:0.75", 0.0, 0.0, 2, 1000)
    assert corpus == cfg.out == os.path.join(str(tmp_path), "corpus")
    assert "sticky-random play" in info["note"] and "sticky-random play" in capsys.readouterr().out
    with_demo = paper_collect.collect_config(PaperBenchConfig(demonstrator="d.pt"))
    assert (with_demo.policy, with_demo.epsilon, with_demo.noise_hold) == ("demonstrator:d.pt", 0.25, 0.75)


def test_the_recipe_defaults_are_the_experiments():
    from lapo_ray.config.experiment import ExperimentConfig

    recipe, cfg = ExperimentConfig().collect, PaperBenchConfig()
    assert (cfg.epsilon, cfg.noise_hold, cfg.game) == (recipe.epsilon, recipe.noise_hold, ExperimentConfig().game)
    with pytest.raises(UsageError, match="not a Procgen game"):
        PaperBenchConfig(game="pong").validate()


# --------------------------------------------------------------------------- the demonstrator file


@pytest.mark.parametrize("latent_dim", [None, 16])
def test_an_agent_file_loads_to_the_same_network(tmp_path, latent_dim):
    path = agent_file(tmp_path / "a.pt", latent_dim)
    net, about = load_agent_file(path)
    torch.manual_seed(0)
    same = AgentNet(CPU_POLICY, 15, (64, 64, 3), latent_dim, (32,) if latent_dim else ())
    obs = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(net(obs), same(obs))
    assert about["about"] == {"variant": "test"} and not net.training


def test_a_bad_agent_file_is_one_line(tmp_path):
    with pytest.raises(MissingPathError, match="no such agent file"):
        load_agent_file(str(tmp_path / "none.pt"))
    (tmp_path / "x.pt").write_bytes(b"not torch")
    with pytest.raises(UsageError) as e:
        load_agent_file(str(tmp_path / "x.pt"))
    assert "\n" not in str(e.value) and "not a readable agent file" in str(e.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "y.pt")
    with pytest.raises(UsageError, match="not a lapo_ray agent file"):
        load_agent_file(str(tmp_path / "y.pt"))


def test_the_demonstrator_collects_without_ray(tmp_path):
    from lapo_ray.config import CollectConfig
    from lapo_ray.data.collect import collect_local
    from lapo_ray.data.corpus import read_actions

    cfg = CollectConfig(out=str(tmp_path / "c"), frames=300, num_workers=1, envs_per_worker=4, shard_frames=200,
                        policy=f"demonstrator:{agent_file(tmp_path / 'd.pt')}", epsilon=0.25, noise_hold=0.75)
    manifest = collect_local(cfg, policy_factories=paper_collect.POLICY_FACTORIES)
    assert manifest.num_frames >= 300 and manifest.made_by["policy"] == cfg.policy
    actions = read_actions(cfg.out)
    assert len(actions) == manifest.num_frames and actions.min() >= 0 and actions.max() < 15


@pytest.mark.slow
@pytest.mark.parametrize("scratch", [True, False])
def test_an_exported_rllib_agent_plays_with_the_modules_logits(tmp_path, monkeypatch, scratch):
    """The RLlib module (built without a cluster) and the file's AgentNet give the same logits:
    every parameter name and the arithmetic of the two heads agree."""
    import gymnasium as gym
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from lapo_ray.config import config_from_dict
    from lapo_ray.rl import export
    from lapo_ray.rl.module import LapoAgentModule

    config = {"latent_policy_checkpoint": None if scratch else "stage2-ckpt",
              "policy": dataclasses.asdict(CPU_POLICY), "decoder_hidden": [32]}
    if not scratch:  # a decoded agent's latent policy, as its stage-2 checkpoint would give it
        from lapo_ray.models import LatentPolicy

        model_cfg = dataclasses.replace(PRETRAIN_PRESETS["cpu"]().model, policy=CPU_POLICY)
        loaded = lambda ckpt: (LatentPolicy(CPU_POLICY, 16, 3, 64), model_cfg)  # noqa: E731
        monkeypatch.setattr("lapo_ray.rl.module.load_latent_policy", loaded)
        monkeypatch.setattr(export, "load_latent_policy", loaded)
    module = RLModuleSpec(module_class=LapoAgentModule, observation_space=gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),
                          action_space=gym.spaces.Discrete(15), model_config=config).build()
    with torch.no_grad():  # heads away from zero, so both halves of the logits count
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    variant = "scratch" if scratch else "rl+sl"
    monkeypatch.setattr(export, "load_agent", lambda uri: (module.eval(), {"variant": variant}))
    path = export.export_agent("agent-folder", str(tmp_path / "agent.pt"))  # checks the logits itself
    net, about = load_agent_file(path)
    assert about["about"]["variant"] == ("scratch" if scratch else "rl+sl") and net.scratch == scratch
    assert config_from_dict(PolicyConfig, about["policy"]) == CPU_POLICY
    with pytest.raises(UsageError, match="exists"):
        export.export_agent("agent-folder", path)


# --------------------------------------------------------------------------- the official step


OFFICIAL_MODELS = '''
import config
import data_loader
import torch
import torch.nn as nn
import torch.nn.functional as F
from funcy import partition
from tensordict import TensorDict


class IDM(nn.Module):
    def __init__(self, vq_config: config.VQConfig, obs_shape, action_dim, impala_scale):
        super().__init__()
        self.net = nn.Linear(obs_shape[0] * 64 * 64, action_dim)

    def forward(self, x):
        la = self.net(x.reshape(len(x), -1))
        return TensorDict(dict(la=la, la_q=la), batch_size=len(la)), (la ** 2).mean(), 1.0

    def label(self, batch):
        td, vq_loss, perp = self(batch["obs"])
        batch.update(td)
        return vq_loss, perp


class WorldModel(nn.Module):
    def __init__(self, action_dim, in_depth, out_depth, base_size=16):
        super().__init__()
        assert [len(w) for w in partition(2, 1, (1, 2, 3))] == [2, 2]
        self.net = nn.Linear(action_dim, out_depth * 64 * 64)

    def label(self, batch):
        pred = self.net(batch["la_q"]).reshape(-1, 3, 64, 64)
        return F.mse_loss(pred, batch["obs"][:, -1])
'''


def test_the_official_step_is_timed_from_a_checkout_and_leaves_no_stand_ins(tmp_path):
    (tmp_path / "lapo").mkdir()
    (tmp_path / "lapo" / "models.py").write_text(OFFICIAL_MODELS)
    got = official.time_official_step(str(tmp_path), torch.device("cpu"), batch_size=2, steps=2, warmup=1)
    assert got["timed"] and got["samples_per_s"] > 0 and got["precision"] == "fp32" and got["parameters"] > 0
    assert not {"config", "data_loader"} & set(sys.modules)
    assert official.time_official_step("", torch.device("cpu"))["why"] == "no --official-lapo checkout given"
    with pytest.raises(UsageError, match="no lapo/models.py"):
        official.time_official_step(str(tmp_path / "lapo" / "nothing"), torch.device("cpu"))


# --------------------------------------------------------------------------- the training pieces


class TinyTask:
    """A stage task of one linear layer on the frames' mean pixel: steps in microseconds."""

    name = "tiny"

    def build(self):
        return torch.nn.Linear(1, 1)

    def loss(self, model, batch):
        loss = model(batch["frames"].float().mean((1, 2, 3, 4)).unsqueeze(1) / 255).pow(2).mean()
        return loss, {"loss": loss}


def tiny_batches():
    g = torch.Generator().manual_seed(0)
    while True:
        yield {"frames": torch.randint(0, 256, (4, 3, 2, 2, 3), dtype=torch.uint8, generator=g)}


def tiny_trainee():
    stage = dataclasses.replace(PRETRAIN_PRESETS["cpu"]().stage1, precision="fp32", steps=20, warmup_steps=1)
    return make_trainee("stage1", TinyTask(), stage, torch.device("cpu"), compile=False)


def test_timing_alone_leaves_the_model_and_optimiser_at_their_start():
    t = tiny_trainee()
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    timing = time_alone(t, tiny_batches(), warmup=2, steps=3, with_flops=True)
    assert all(torch.equal(start[k], v) for k, v in t.model.state_dict().items())
    assert t.step.optimizer.state_dict()["state"] == {} and t.steps_done == 0
    assert timing["samples_per_s"] > 0 and timing["gflop_per_sample"] > 0 and timing["mfu"] is None


def test_a_model_that_fails_to_compile_trains_eagerly_and_says_why(capsys):
    t = tiny_trainee()
    t.compile.update(asked=True, used=True)

    def broken(*args, **kwargs):
        raise AssertionError("expected size 384==384, stride 4==1 at dim=1")

    t.step.train_model = broken
    guarded_step(t, next(tiny_batches()), 0)
    assert t.compile["used"] is False and t.compile["error"].startswith("AssertionError: expected size 384")
    assert t.step.train_model is t.model and t.step.take_means()["loss"] > 0


def test_lockstep_runs_both_on_the_same_batches_and_stops_at_the_deadline():
    a, b = tiny_trainee(), tiny_trainee()
    seen = []
    out = Lockstep([a, b], 5, time.monotonic() + 60, seen.append).run(tiny_batches())
    assert (out["steps"], out["stop_reason"], a.steps_done, b.steps_done, seen) == (5, "steps", 5, 5, [1, 2, 3, 4, 5])
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    late = Lockstep([tiny_trainee()], 1000, time.monotonic() - 1).run(tiny_batches())
    assert (late["steps"], late["stop_reason"]) == (0, "time limit")


def test_a_corpus_the_device_cannot_hold_is_refused_before_training(tmp_path, monkeypatch):
    from test_multi_corpus import write_game

    from lapo_ray.benchmarks import paper

    corpus = write_game(str(tmp_path / "corpus"), 0, "coinrun")
    monkeypatch.setattr(paper, "device_memory", lambda device: ("GPU-X", 2**20))
    monkeypatch.setattr(paper, "build_models", lambda *a: pytest.fail("built models for a corpus that does not fit"))
    with pytest.raises(UsageError) as e:
        paper.run(PaperBenchConfig(out=str(tmp_path / "out"), corpus=corpus, preset="cpu", device="cpu"))
    assert "\n" not in str(e.value) and "but GPU-X has 0.0 GiB free" in str(e.value)
