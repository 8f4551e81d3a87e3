"""Stage 3 on RLlib: the LAPO agent module, its Learner (decoder supervision, reward scaling,
per-part optimisers), PPO runs with 2 env runners, env-runner failure, offline decoding and
evaluation."""

from __future__ import annotations

import dataclasses
import os
import signal

import gymnasium as gym
import numpy as np
import pytest
import torch

from lapo_ray.config import PretrainConfig, cpu_pretrain
from lapo_ray.config.models import PolicyConfig
from lapo_ray.config.rl import EvalConfig, FinetuneConfig, PartSchedule, PPOConfig, cpu_finetune
from lapo_ray.models import build_models
from lapo_ray.train.checkpoint import save_checkpoint

OBS_SPACE = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
ACT_SPACE = gym.spaces.Discrete(15)


def tiny_pretrain_config() -> PretrainConfig:
    cfg = cpu_pretrain()
    cfg.model.policy = PolicyConfig(impala_scale=1, impala_channels=(4, 8, 8), impala_features=32)
    return cfg


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory) -> str:
    """A pretrain artifact folder in the real checkpoint layout, with random (seeded) weights."""
    out = tmp_path_factory.mktemp("pretrain")
    cfg = tiny_pretrain_config()
    torch.manual_seed(0)
    models = build_models(cfg.model)
    # Non-trivial head weights, so a wrongly transferred layer cannot pass by being near zero.
    torch.nn.init.normal_(models.policy.head.weight, std=0.5)
    for stage, model in (("stage1", models.dynamics), ("stage2", models.policy)):
        save_checkpoint(str(out / stage / "checkpoint_000000"), model, None,
                        {"step": 1, "train_seconds": 0.0, "done": True}, cfg.to_dict())
    return str(out)


def build_module(pretrain_dir: str | None):
    from lapo_ray.rl.module import LapoAgentModule
    from lapo_ray.train.checkpoint import Checkpoint

    stage2 = None if pretrain_dir is None else Checkpoint.latest(os.path.join(pretrain_dir, "stage2")).uri
    return LapoAgentModule(
        observation_space=OBS_SPACE, action_space=ACT_SPACE,
        model_config={"latent_policy_checkpoint": stage2,
                      "policy": dataclasses.asdict(tiny_pretrain_config().model.policy),
                      "decoder_hidden": [16, 16]},
    )


def random_obs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))


def test_module_reproduces_the_latent_policy_exactly(pretrain_dir):
    from lapo_ray.train.checkpoint import Checkpoint, load_latent_policy

    policy, _ = load_latent_policy(Checkpoint.latest(os.path.join(pretrain_dir, "stage2")).uri)
    module = build_module(pretrain_dir)
    obs = random_obs(8)
    with torch.no_grad():
        expected = policy(obs)
        got = module.latent_action(obs)
    assert expected.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The RL trunk starts as the same linear layer but is a separate parameter.
    assert module.fc_rl.weight is not module.fc_sl.weight
    torch.testing.assert_close(module.fc_rl.weight, module.fc_sl.weight, rtol=0, atol=0)
    assert not any(p.requires_grad for p in module.latent_head.parameters())


def test_initial_action_distribution_is_the_decoded_latent_policy(pretrain_dir):
    from ray.rllib.core.columns import Columns

    module = build_module(pretrain_dir)
    obs = random_obs(16, seed=1)
    with torch.no_grad():
        logits = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        decoded = module.decoded_logits(module.latent_action(obs))
        values = module.compute_values({Columns.OBS: obs})
    assert torch.count_nonzero(module.rl_head.weight) == 0
    probs, expected = torch.softmax(logits, -1), torch.softmax(decoded, -1)
    assert (expected.max(-1).values - expected.min(-1).values).min() > 1e-4  # not uniform
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-7)
    assert values.shape == (16,)
    # The agent's logits are the mean of both heads: moving the RL head moves them by half.
    with torch.no_grad():
        module.rl_head.bias[3] = 2.0
        shifted = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(shifted - logits, torch.nn.functional.one_hot(torch.tensor(3), 15).float().expand(16, 15))


def test_scratch_module_has_no_latent_path_and_starts_uniform():
    from ray.rllib.core.columns import Columns

    module = build_module(None)
    assert module.scratch and not hasattr(module, "decoder")
    with torch.no_grad():
        logits = module.forward_inference({Columns.OBS: random_obs(4)})[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(torch.softmax(logits, -1), torch.full((4, 15), 1 / 15))
    assert module.part_parameters("decoder") == []


def test_part_schedules_follow_the_paper_order():
    ppo = PPOConfig(env_steps=1000, lr=1.0, convs=PartSchedule(0.0), rl_head=PartSchedule(0.25, start=100, ramp=50),
                    value_head=PartSchedule(0.5, ramp=10), trunk=PartSchedule(0.1, start=200), decoder=PartSchedule())
    s = ppo.part_schedules(scratch=False)
    assert s["convs"] == 0.0
    assert s["rl_head"] == [[0, 0.0], [100, 0.0], [150, 0.25], [1000, 0.0]]
    assert s["value_head"] == [[0, 0.0], [10, 0.5], [1000, 0.0]]
    assert s["trunk"] == [[0, 0.0], [200, 0.0], [201, 0.1], [1000, 0.0]]
    assert s["decoder"] == [[0, 1.0], [1000, 0.0]]
    scratch = ppo.part_schedules(scratch=True)
    assert all(v == [[0, ppo.scratch_lr], [1000, 0.0]] for v in scratch.values())


def test_bad_finetune_flags_are_named(capsys):
    from lapo_ray.config.cli import parse_config
    from lapo_ray.config.rl import FINETUNE_PRESETS

    with pytest.raises(SystemExit):
        parse_config(FinetuneConfig, FINETUNE_PRESETS, ["--num-env-runners", "two"])
    assert "argument --num-env-runners: invalid int value: 'two'" in capsys.readouterr().err
    cfg = cpu_finetune()
    cfg.ppo.num_minibatches = 7
    with pytest.raises(ValueError, match=r"train batch 2048 \(runners x envs x rollout length\) is not divisible by "
                                         r"--ppo.num-minibatches 7"):
        cfg.validate()
    cfg = cpu_finetune()
    cfg.env.game = "pong"
    with pytest.raises(ValueError, match="'pong' is not a Procgen game"):
        cfg.validate()


def test_missing_pretrain_folder_is_a_clear_error(tmp_path):
    from lapo_ray.rl.algo import pretrain_checkpoints

    with pytest.raises(FileNotFoundError, match=r"no stage1 checkpoint; run `python jobs/pretrain.py"):
        pretrain_checkpoints(str(tmp_path / "nothing-here"))


# ---- PPO on RLlib (Ray) -------------------------------------------------------------------


def test_learner_settings_carry_the_config_under_one_key(pretrain_dir, tmp_path):
    """The Learner's settings are one LearnerSettings built from the FinetuneConfig, under one key
    of learner_config_dict, and they survive the copies RLlib makes of its config (no Ray here)."""
    import pickle

    from ray import cloudpickle

    from lapo_ray.config.rl import LearnerSettings
    from lapo_ray.rl.algo import build_algorithm_config, pretrain_checkpoints
    from lapo_ray.rl.learner import SETTINGS_KEY, learner_settings

    cfg = tiny_finetune(pretrain_dir, str(tmp_path), sl_coeff=0.3, decoder_rl_grad=True, decoder_buffer=123,
                        decoder_sl_batch=45, normalize_rewards=False, reward_clip=2.5)
    config = build_algorithm_config(cfg)
    assert list(config.learner_config_dict) == [SETTINGS_KEY]
    assert not [k for k in config.learner_config_dict if k.startswith("lapo_")]
    expected = LearnerSettings(
        parts=cfg.ppo.part_schedules(scratch=False), idm_checkpoint=pretrain_checkpoints(pretrain_dir)[0],
        sl_coeff=0.3, decoder_rl_grad=True, decoder_buffer=123, decoder_sl_batch=45, normalize_rewards=False,
        reward_clip=2.5,
    )
    assert learner_settings(config) == expected
    assert expected.parts["convs"] == 0.0 and expected.parts["decoder"] != 0.0  # the cpu preset's schedules
    with pytest.raises(dataclasses.FrozenInstanceError):
        learner_settings(config).sl_coeff = 1.0
    # What remote Learners and checkpoints get: a deep copy, a (cloud)pickled config, its state.
    assert learner_settings(config.copy()) == expected
    assert learner_settings(cloudpickle.loads(cloudpickle.dumps(config))) == expected
    assert pickle.loads(pickle.dumps(config.get_state()))["learner_config_dict"][SETTINGS_KEY] == expected

    # Without an IDM (from scratch, or "RL, no SL") there is nothing to supervise the decoder with.
    scratch = learner_settings(build_algorithm_config(tiny_finetune(None, str(tmp_path))))
    assert scratch.idm_checkpoint is None and scratch.parts == cfg.ppo.part_schedules(scratch=True)
    assert learner_settings(build_algorithm_config(tiny_finetune(pretrain_dir, str(tmp_path), decoder_sl=False))
                            ).idm_checkpoint is None
    # Unset, each value is PPOConfig's own default.
    default = learner_settings(build_algorithm_config(tiny_finetune(pretrain_dir, str(tmp_path))))
    ppo = PPOConfig()
    assert (default.sl_coeff, default.decoder_rl_grad, default.decoder_buffer, default.decoder_sl_batch,
            default.normalize_rewards, default.reward_clip) == (
        ppo.sl_coeff, ppo.decoder_rl_grad, ppo.decoder_buffer, ppo.decoder_sl_batch, ppo.normalize_rewards,
        ppo.reward_clip)


def tiny_finetune(pretrain_dir: str | None, out: str, **ppo_overrides) -> FinetuneConfig:
    cfg = cpu_finetune()
    cfg.out = out
    cfg.pretrain = pretrain_dir or ""
    cfg.scratch = pretrain_dir is None
    cfg.num_env_runners, cfg.envs_per_runner, cfg.cpus_per_env_runner = 2, 4, 0.5
    cfg.decoder_hidden = (16, 16)
    cfg.scratch_policy = tiny_pretrain_config().model.policy
    cfg.ppo = dataclasses.replace(cfg.ppo, rollout_length=16, num_minibatches=2, num_epochs=1, env_steps=256,
                                  **ppo_overrides)
    cfg.checkpoint_every = 1
    cfg.wandb.mode = "disabled"
    cfg.validate()
    return cfg


def check_iterations(algo, cfg: FinetuneConfig, n: int, supervised: bool) -> int:
    """Train ``n`` iterations; each samples exactly one train batch and has finite losses."""
    from lapo_ray.rl.algo import iteration_metrics, sampled_env_steps

    steps = sampled_env_steps(algo)
    for _ in range(n):
        row = iteration_metrics(algo.train(), "coinrun", 1.0, steps)
        assert row["env_steps"] - steps == cfg.train_batch  # 2 runners x 4 envs x 16 steps
        steps = row["env_steps"]
        for key in ("policy_loss", "vf_loss", "entropy"):
            assert np.isfinite(row[key]), (key, row)
        if supervised:
            assert 0.0 <= row["decoder_accuracy"] <= 1.0 and np.isfinite(row["decoder_sl_loss"])
        else:
            assert np.isnan(row["decoder_accuracy"])
    return steps


@pytest.mark.slow
def test_ppo_with_decoder_supervision_survives_a_killed_env_runner(ray_local, pretrain_dir, tmp_path):
    """RL + SL with 2 env runners: two iterations with finite losses, then one runner process is
    SIGKILLed; training goes on and the runner is replaced."""
    from lapo_ray.rl.algo import build_algorithm_config

    cfg = tiny_finetune(pretrain_dir, str(tmp_path))
    algo = build_algorithm_config(cfg).build_algo()
    try:
        steps = check_iterations(algo, cfg, 2, supervised=True)
        module = algo.learner_group._learner.module["default_policy"]
        assert not any(p.requires_grad for p in module.convs.parameters())  # frozen in the cpu preset
        group = algo.env_runner_group
        pids = group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)
        assert len(set(pids)) == 2
        # Each runner's torch threads are the whole number of its CPUs, at least one (0.5 here).
        assert group.foreach_env_runner(lambda r: torch.get_num_threads(), local_env_runner=False) == [1, 1]
        os.kill(pids[0], signal.SIGKILL)
        after = [iteration_steps(algo) for _ in range(3)]
        assert after == sorted(after) and after[0] > steps  # training went on
        for _ in range(30):  # the restart is asynchronous
            if group.num_healthy_remote_workers() == 2:
                break
            algo.train()
        assert group.num_healthy_remote_workers() == 2
        new_pids = group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)
        assert pids[0] not in new_pids and pids[1] in new_pids
    finally:
        algo.stop()


def iteration_steps(algo) -> int:
    from lapo_ray.rl.algo import sampled_env_steps

    algo.train()
    return sampled_env_steps(algo)


def _episode(frames: np.ndarray, lookback: int, terminated: bool):
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    n = len(frames) - 1 - lookback
    return SingleAgentEpisode(
        observations=list(frames), actions=list(range(n + lookback)), rewards=[0.0] * (n + lookback),
        terminated=terminated, len_lookback_buffer=lookback,
    )


def test_idm_labels_cover_exactly_the_complete_triplets(pretrain_dir):
    from lapo_ray.rl.connectors import AddIDMLatentsToBatch, LabelTripletsWithIDM
    from lapo_ray.train.checkpoint import Checkpoint, load_dynamics

    idm = load_dynamics(Checkpoint.latest(os.path.join(pretrain_dir, "stage1")).uri)
    frames = random_obs(7, seed=3).numpy()
    fresh_done = _episode(frames[1:], lookback=0, terminated=True)  # obs o1..o6, 5 steps, ended
    continued = _episode(frames, lookback=1, terminated=False)  # o0 in the lookback, 6 obs, 5 steps
    shared: dict = {}
    LabelTripletsWithIDM(idm=idm)(rl_module=None, batch={}, episodes=[fresh_done, continued], shared_data=shared)
    labels = shared["lapo_idm_labels"]

    def encode(i):  # the IDM's latent of the triplet centred on frames[i]
        return idm.encode(torch.from_numpy(frames[i - 1:i + 2][None]))[0][0].numpy()

    latents, valid = labels[id(fresh_done)]
    # Step 0 has no o[t-1]; step 4's o[t+1] is the env's stand-in final frame.
    assert valid.tolist() == [False, True, True, True, False]
    for t in (1, 2, 3):
        np.testing.assert_allclose(latents[t], encode(t + 1), atol=1e-5)
    latents, valid = labels[id(continued)]
    # o[t-1] of step 0 comes from the lookback buffer; the chunk did not end, so o[t+1] is real.
    assert valid.tolist() == [True] * 5
    for t in range(5):
        np.testing.assert_allclose(latents[t], encode(t + 1), atol=1e-5)
    # After PPO's phantom step the batch columns are one longer, and the phantom is unlabelled.
    from ray.rllib.utils.postprocessing.episodes import add_one_ts_to_episodes_and_truncate

    add_one_ts_to_episodes_and_truncate([fresh_done])
    batch: dict = {}
    AddIDMLatentsToBatch()(rl_module=None, batch=batch, episodes=[fresh_done],
                           shared_data={"lapo_idm_labels": {id(fresh_done): labels[id(fresh_done)]}})
    mask = [m for items in batch["lapo_idm_latent_mask"].values() for m in items]
    assert mask == [False, True, True, True, False, False]


def test_idm_labels_with_a_frame_offset_need_both_ends_in_the_chunk(pretrain_dir):
    import copy

    from lapo_ray.rl.connectors import LabelTripletsWithIDM
    from lapo_ray.train.checkpoint import Checkpoint, load_dynamics

    idm = copy.deepcopy(load_dynamics(Checkpoint.latest(os.path.join(pretrain_dir, "stage1")).uri))
    idm.cfg.frame_offset = 2
    frames = random_obs(9, seed=4).numpy()
    fresh_done = _episode(frames[1:], lookback=0, terminated=True)  # o1..o8, 7 steps, ended
    continued = _episode(frames, lookback=1, terminated=False)  # o0 in the lookback, o1..o8, 7 steps
    shared: dict = {}
    LabelTripletsWithIDM(idm=idm)(rl_module=None, batch={}, episodes=[fresh_done, continued], shared_data=shared)
    labels = shared["lapo_idm_labels"]

    def encode(i):  # the IDM's latent of (frames[i-2], frames[i], frames[i+2])
        return idm.encode(torch.from_numpy(frames[i - 2:i + 3:2][None]))[0][0].numpy()

    latents, valid = labels[id(fresh_done)]
    # Steps 0-1 lack o[t-2]; steps 5-6 would need the stand-in final frame or beyond.
    assert valid.tolist() == [False, False, True, True, True, False, False]
    for t in (2, 3, 4):
        np.testing.assert_allclose(latents[t], encode(t + 1), atol=1e-5)
    latents, valid = labels[id(continued)]
    # One frame of lookback: step 0 still lacks o[t-2]; the chunk goes on, so o[7] (the
    # observation after its last step) is real and step 5 is complete; step 6 needs o[8].
    assert valid.tolist() == [False, True, True, True, True, True, False]
    for t in range(1, 6):
        np.testing.assert_allclose(latents[t], encode(t + 1), atol=1e-5)


@pytest.mark.slow
def test_finetune_checkpoints_resumes_and_evaluates(ray_local, pretrain_dir, tmp_path):
    from lapo_ray.config.rl import EvaluateConfig
    from lapo_ray.rl.algo import finetune
    from lapo_ray.rl.evaluate import evaluate_agent
    from lapo_ray.train.metrics import read_metrics

    out = str(tmp_path / "ft")
    cfg = tiny_finetune(pretrain_dir, out, decoder_sl=False)  # the "RL, no SL" variant end to end
    summary = finetune(cfg)
    assert summary["env_steps"] == 256 and summary["variant"] == "rl"
    assert os.path.isdir(os.path.join(out, "checkpoint")) and os.path.getsize(os.path.join(out, "plots", "return.png")) > 0
    assert [r["env_steps"] for r in read_metrics(out)] == [128, 256]
    cfg.ppo.env_steps = 384  # a longer budget continues from the checkpoint, not from zero
    summary = finetune(cfg)
    assert [r["env_steps"] for r in read_metrics(out)] == [128, 256, 384]
    assert not [p for p in os.listdir(out) if ".tmp-" in p or ".old-" in p]

    report = evaluate_agent(EvaluateConfig(agent=out, eval=EvalConfig(episodes=4, num_envs=4)))
    for levels in ("train_levels", "held_out_levels"):
        r = report[levels]
        assert r["episodes"] == 4 and np.isfinite(r["return_norm_mean"])
        assert r["return_mean"] in (0.0, 10.0) or 0.0 < r["return_mean"] < 10.0  # coinrun pays 10 per coin
    assert report["held_out_levels"]["levels"]["start_level"] == EvalConfig().held_out_start_level
    assert os.path.exists(os.path.join(out, "evaluation.json"))


@pytest.mark.slow
def test_offline_decoding_learns_from_k_labels_and_plays(ray_local, pretrain_dir, tmp_path):
    """Real corpus, real IDM latents: the decoder reaches what its inputs allow on its k frames,
    the module checkpoint round-trips, and the decoded agent is evaluated on both level sets."""
    import json

    from lapo_ray.config import CollectConfig
    from lapo_ray.config.rl import DecodeConfig
    from lapo_ray.data.collect import collect
    from lapo_ray.rl.decode import decode_offline
    from lapo_ray.rl.evaluate import load_agent

    corpus = str(tmp_path / "corpus")
    collect(CollectConfig(out=corpus, frames=3000, num_workers=1, envs_per_worker=8, policy="sticky:0.75"))
    # The pretrain folder's config names its corpus and split; decoding must reuse both.
    pre_cfg = tiny_pretrain_config()
    pre_cfg.corpus = corpus
    with open(os.path.join(pretrain_dir, "config.json"), "w") as f:
        json.dump(pre_cfg.to_dict(), f)
    cfg = DecodeConfig(out=str(tmp_path / "dec"), pretrain=pretrain_dir, decoder_hidden=(16, 16),
                       eval=EvalConfig(episodes=4, num_envs=4))
    cfg.decoder.k, cfg.decoder.epochs, cfg.decoder.held_out = 64, 200, 256
    cfg.decoder.label_smoothing = 0.0
    report = decode_offline(cfg)
    assert report["k"] == 64 and 100 < report["val_triplets"] <= 256  # the val split of 3k frames is small
    # The decoder really learns from its k frames: its loss falls to at most the entropy of the
    # action frequencies (an untrained IDM's latents carry almost nothing beyond those).
    assert report["decoder_train_loss_end"] < report["decoder_train_loss_start"]
    assert report["decoder_train_loss_end"] <= report["train_action_entropy"] + 0.02
    assert report["decoder_train_accuracy"] >= report["train_majority_action_rate"]
    assert 0.0 <= report["decoder_val_accuracy"] <= 1.0 and 0.0 < report["majority_action_rate"] < 1.0
    assert report["train_levels"]["episodes"] == 4 and report["held_out_levels"]["episodes"] == 4

    module, agent_cfg = load_agent(cfg.out)
    assert agent_cfg["variant"] == "offline-decoded"
    obs = random_obs(4)
    with torch.no_grad():
        from ray.rllib.core.columns import Columns

        reloaded = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        assert torch.count_nonzero(module.rl_head.weight) == 0
        torch.testing.assert_close(torch.softmax(reloaded, -1),
                                   torch.softmax(module.decoded_logits(module.latent_action(obs)), -1))


def test_jobs_name_a_missing_input_in_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    missing = str(tmp_path / "no-such-agent")
    proc = subprocess.run([sys.executable, os.path.join(root, "jobs", "evaluate.py"), "--agent", missing],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {missing}: not a finetune or decode artifact folder (no config.json)"
    assert "Traceback" not in proc.stderr


# ---- stage 3's decoder: supervision only, as in the paper -------------------------------------


def _one_learner_update(pretrain_dir: str, out: str, **ppo):
    """Build the Learner alone (no env runners, no Ray cluster) and update it once on one
    8-step episode chunk, in a single minibatch. Returns (learner, module, decoder before)."""
    import copy

    from ray.rllib.core.columns import Columns
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from lapo_ray.rl.algo import build_algorithm_config

    cfg = tiny_finetune(pretrain_dir, out, **ppo)
    learner = build_algorithm_config(cfg).build_learner(spaces={"default_policy": (OBS_SPACE, ACT_SPACE)})
    module = learner.module["default_policy"]
    obs = random_obs(9, seed=5).numpy()
    actions = np.arange(8) % 15
    with torch.no_grad():
        logits = module.forward_inference({Columns.OBS: torch.from_numpy(obs[:-1])})[Columns.ACTION_DIST_INPUTS]
    logp = torch.log_softmax(logits, -1)[torch.arange(8), torch.as_tensor(actions)]
    episode = SingleAgentEpisode(
        observations=list(obs), actions=list(actions), rewards=[1.0, -1.0] * 4, terminated=False, len_lookback_buffer=0,
        extra_model_outputs={Columns.ACTION_LOGP: list(logp.numpy()), Columns.ACTION_DIST_INPUTS: list(logits.numpy())},
    )
    before = copy.deepcopy(module.decoder)
    learner.update(episodes=[episode], timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 0}, num_epochs=1, minibatch_size=64)
    opt = learner.get_optimizer("default_policy", "decoder")
    assert {int(s["step"]) for s in opt.state.values()} == {1}  # exactly one decoder step
    return cfg, learner, module, before, obs, actions


def _supervised_step_alone(cfg, decoder, latents, actions):
    """What one step of the decoder's optimiser does with the cross-entropy alone."""
    lr = cfg.ppo.decoder.schedule(cfg.ppo.lr, cfg.ppo.env_steps)[0][1]
    opt = torch.optim.Adam(decoder.parameters(), lr=lr, eps=1e-5)
    loss = cfg.ppo.sl_coeff * torch.nn.functional.cross_entropy(0.5 * decoder(latents), actions, label_smoothing=0.05)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.ppo.grad_clip)
    opt.step()
    return decoder


def test_decoder_takes_no_rl_gradient_and_learns_by_supervision_alone(pretrain_dir, tmp_path):
    from ray.rllib.core.columns import Columns

    from lapo_ray.train.checkpoint import Checkpoint, load_dynamics

    cfg, learner, module, before, obs, actions = _one_learner_update(pretrain_dir, str(tmp_path))
    # The stored pairs: the IDM's latent of each complete triplet and the action taken there
    # (step 0 has no o[t-1]; the chunk did not end, so step 7's o[t+1] is real).
    idm = load_dynamics(Checkpoint.latest(os.path.join(pretrain_dir, "stage1")).uri)
    triplets = torch.from_numpy(np.stack([obs[t - 1:t + 2] for t in range(1, 8)]))
    latents = idm.encode(triplets)[0]
    pairs = learner._pairs
    assert len(pairs) == 7
    torch.testing.assert_close(pairs.latents[:7], latents, atol=1e-5, rtol=0)
    assert pairs.actions[:7].tolist() == actions[1:8].tolist()

    # The decoder moved exactly as the cross-entropy on those pairs alone moves it.
    import copy

    expected = _supervised_step_alone(cfg, copy.deepcopy(before), latents, torch.as_tensor(actions[1:8]))
    moved = 0.0
    for (name, got), want in zip(module.decoder.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5, msg=name)
        moved = max(moved, (got - dict(before.named_parameters())[name]).abs().max().item())
    assert moved > 1e-4  # it did learn

    # PPO's loss cannot reach the decoder: the action logits carry no gradient to it.
    out = module.forward_train({Columns.OBS: torch.from_numpy(obs[:8])})
    grads = torch.autograd.grad(out[Columns.ACTION_DIST_INPUTS].pow(2).sum(), list(module.decoder.parameters()),
                                allow_unused=True)
    assert all(g is None for g in grads)


def test_decoder_rl_grad_flag_restores_the_joint_update(pretrain_dir, tmp_path):
    from ray.rllib.core.columns import Columns

    cfg, learner, module, before, obs, actions = _one_learner_update(pretrain_dir, str(tmp_path), decoder_rl_grad=True)
    assert learner._pairs is None
    out = module.forward_train({Columns.OBS: torch.from_numpy(obs[:8])})
    grads = torch.autograd.grad(out[Columns.ACTION_DIST_INPUTS].pow(2).sum(), list(module.decoder.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)
    # The cross-entropy here is on the same 7 labelled steps, so PPO's gradient is what makes the
    # update differ from the supervised one: the default's exact match above has teeth.
    from lapo_ray.train.checkpoint import Checkpoint, load_dynamics

    idm = load_dynamics(Checkpoint.latest(os.path.join(pretrain_dir, "stage1")).uri)
    latents = idm.encode(torch.from_numpy(np.stack([obs[t - 1:t + 2] for t in range(1, 8)])))[0]
    expected = _supervised_step_alone(cfg, before, latents, torch.as_tensor(actions[1:8]))
    gap = max((got - want).abs().max().item() for got, want in zip(module.decoder.parameters(), expected.parameters()))
    assert gap > 1e-5, gap


@pytest.mark.slow
def test_an_env_runner_of_two_cpus_takes_two_torch_threads(ray_local, tmp_path):
    # Two runners of half a CPU each take one thread: test_ppo_with_decoder_supervision_survives_a_killed_env_runner.
    from lapo_ray.rl.algo import build_algorithm_config

    cfg = tiny_finetune(None, str(tmp_path))
    cfg.num_env_runners, cfg.cpus_per_env_runner = 1, 2.0
    algo = build_algorithm_config(cfg).build_algo()
    try:
        got = algo.env_runner_group.foreach_env_runner(lambda r: torch.get_num_threads(), local_env_runner=False)
    finally:
        algo.stop()
    assert got == [2]
