"""Online decoding (stage 3): PPO on RLlib's new API stack, from the latent policy or from scratch.

The loop is plain ``algo.train()`` iterations; everything LAPO-specific lives in the RLModule
(:mod:`lapo_ray.rl.module`) and the Learner with its connectors (:mod:`lapo_ray.rl.learner`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

from lapo_ray import MissingPathError, storage, telemetry
from lapo_ray.config.rl import FinetuneConfig
from lapo_ray.envs import normalize_return, register_with_rllib
from lapo_ray.evaluation.plots import plot_return_curves
from lapo_ray.progress import Progress
from lapo_ray.runtime import init_ray
from lapo_ray.train.checkpoint import Checkpoint
from lapo_ray.train.metrics import MetricsSink, WandbRun, read_metrics

CHECKPOINT_DIR = "checkpoint"


def pretrain_checkpoints(pretrain_uri: str) -> tuple[str, str]:
    """(stage-1, stage-2) checkpoint URIs of a pretrain artifact folder, or a clear error."""
    found = []
    for stage in ("stage1", "stage2"):
        ckpt = Checkpoint.latest(storage.join(pretrain_uri, stage))
        if ckpt is None:
            raise MissingPathError(
                f"{pretrain_uri}: no {stage} checkpoint; run `python jobs/pretrain.py --out {pretrain_uri}` first "
                f"(or pass --scratch true for PPO from scratch)"
            )
        found.append(ckpt.uri)
    return found[0], found[1]


def module_spec(cfg: FinetuneConfig):
    # lazy, RLlib: jobs import this before they check their input (architecture.md, Imports)
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from lapo_ray.rl.module import LapoAgentModule

    stage2 = None if cfg.scratch else pretrain_checkpoints(cfg.pretrain)[1]
    return RLModuleSpec(
        module_class=LapoAgentModule,
        model_config={
            "latent_policy_checkpoint": stage2,
            "policy": dataclasses.asdict(cfg.scratch_policy),
            "decoder_hidden": list(cfg.decoder_hidden),
            "decoder_rl_grad": cfg.ppo.decoder_rl_grad or not cfg.ppo.decoder_sl,
        },
    )


def build_algorithm_config(cfg: FinetuneConfig):
    """The RLlib ``PPOConfig`` for a FinetuneConfig (also what the tests and benchmarks build)."""
    # lazy, RLlib: jobs import this before they check their input (architecture.md, Imports)
    from ray.rllib.algorithms.ppo import PPOConfig

    from lapo_ray.rl.env_runner import LapoEnvRunner
    from lapo_ray.rl.learner import SETTINGS_KEY, LapoPPOLearner

    ppo = cfg.ppo
    idm = None
    if not cfg.scratch and ppo.decoder_sl:
        idm = pretrain_checkpoints(cfg.pretrain)[0]
    env_config = {"game": cfg.env.game, "distribution_mode": cfg.env.distribution_mode,
                  "num_levels": cfg.env.num_levels, "start_level": cfg.env.start_level,
                  "num_threads": 1}
    return (
        PPOConfig()
        .environment(env=register_with_rllib(), env_config=env_config)
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            num_envs_per_env_runner=cfg.envs_per_runner,
            gym_env_vectorize_mode="vector_entry_point",
            rollout_fragment_length=ppo.rollout_length,
            num_cpus_per_env_runner=cfg.cpus_per_env_runner,
            num_gpus_per_env_runner=0,
            env_runner_cls=LapoEnvRunner,
        )
        .learners(
            num_learners=ppo.num_learners,
            num_gpus_per_learner=ppo.num_gpus_per_learner,
            learner_class=LapoPPOLearner,
            # One typed object under one key, as RLlib's own custom-Learner examples pass their
            # settings (examples/learners/ppo_with_custom_loss_fn.py): no PPOConfig subclass needed.
            learner_config_dict={SETTINGS_KEY: ppo.learner_settings(cfg.scratch, idm)},
        )
        .training(
            train_batch_size_per_learner=cfg.train_batch // max(1, ppo.num_learners),
            minibatch_size=cfg.train_batch // ppo.num_minibatches // max(1, ppo.num_learners),
            num_epochs=ppo.num_epochs,
            gamma=ppo.gamma,
            lambda_=ppo.gae_lambda,
            clip_param=ppo.clip,
            vf_clip_param=ppo.vf_clip,
            vf_loss_coeff=ppo.vf_coeff,
            entropy_coeff=ppo.entropy_coeff,
            use_kl_loss=False,
            grad_clip=ppo.grad_clip,
            grad_clip_by="global_norm",
        )
        .rl_module(rl_module_spec=module_spec(cfg))
        .fault_tolerance(
            restart_failed_env_runners=True,
            max_num_env_runner_restarts=ppo.max_env_runner_restarts,
        )
        .debugging(seed=cfg.seed)
        .reporting(metrics_num_episodes_for_smoothing=20)
    )


def _save(algo, out_uri: str) -> None:
    """Replace ``<out>/checkpoint`` without ever leaving a half-written one behind."""
    with tempfile.TemporaryDirectory() as d:
        algo.save_to_path(os.path.join(d, CHECKPOINT_DIR))
        storage.upload_dir(os.path.join(d, CHECKPOINT_DIR), storage.join(out_uri, CHECKPOINT_DIR))


def _restore(algo, out_uri: str) -> bool:
    ckpt = storage.join(out_uri, CHECKPOINT_DIR)
    if not storage.exists(ckpt):
        return False
    fs, path = storage.resolve(ckpt)
    algo.restore_from_path(path, filesystem=fs)
    return True


def sampled_env_steps(algo) -> int:
    # lazy, RLlib: jobs import this before they check their input (architecture.md, Imports)
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    return int(algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))


def _scalar(d: dict[str, Any], *keys: str, default: float = float("nan")) -> float:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    try:
        return float(d)
    except (TypeError, ValueError):
        return default


class IterationTimes:
    """Wall seconds of each part of the last ``algo.train()``, unsmoothed.

    RLlib times the parts of an iteration (sampling, the learner update, the weight sync) in
    ``with algo.metrics.log_time(...)`` blocks but reports exponential moving averages with a
    small coefficient, so its ``timers`` repeat the first iteration's values for many iterations.
    This wraps those same blocks and keeps each one's own duration: ``times["sample"]`` etc.
    Call ``reset()`` before each ``algo.train()``; install again after a restore."""

    NAMES = {"env_runner_sampling_timer": "sample", "learner_update_timer": "learn",
             "synch_worker_weights_timer": "sync_weights"}

    def __init__(self, algo):
        self.times: dict[str, float] = {}
        metrics = algo.metrics
        original = metrics.log_time
        times = self.times

        class _Timed:
            def __init__(self, key, kwargs):
                self.inner = original(key, **kwargs)
                parts = key if isinstance(key, tuple) else (key,)
                self.name = IterationTimes.NAMES.get(parts[-1], parts[-1])

            def __enter__(self):
                self.t0 = time.perf_counter()
                return self.inner.__enter__()

            def __exit__(self, *exc):
                try:
                    return self.inner.__exit__(*exc)
                finally:
                    times[self.name] = times.get(self.name, 0.0) + time.perf_counter() - self.t0

        metrics.log_time = lambda key, **kwargs: _Timed(key, kwargs)

    def reset(self) -> None:
        self.times.clear()

    def get(self, name: str) -> float:
        return self.times.get(name, float("nan"))


def iteration_metrics(result: dict[str, Any], game: str, seconds: float, prev_steps: int,
                      times: IterationTimes | None = None) -> dict[str, Any]:
    # lazy, RLlib: jobs import this before they check their input (architecture.md, Imports)
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, LEARNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    env = result.get(ENV_RUNNER_RESULTS, {})
    learner = result.get(LEARNER_RESULTS, {}).get("default_policy", {})
    steps = int(_scalar(result, NUM_ENV_STEPS_SAMPLED_LIFETIME, default=_scalar(env, NUM_ENV_STEPS_SAMPLED_LIFETIME, default=0)))
    ret = _scalar(env, "episode_return_mean")
    return {
        "env_steps": steps,
        "episode_return": ret,
        "episode_return_norm": normalize_return(game, ret) if ret == ret else ret,
        "episode_len": _scalar(env, "episode_len_mean"),
        "env_steps_per_s": (steps - prev_steps) / max(seconds, 1e-9),
        "decoder_accuracy": _scalar(learner, "decoder_accuracy"),
        "decoder_sl_loss": _scalar(learner, "decoder_sl_loss"),
        "policy_loss": _scalar(learner, "policy_loss"),
        "vf_loss": _scalar(learner, "vf_loss"),
        "entropy": _scalar(learner, "entropy"),
        # Where this iteration's time went: sampling on the env runners vs the Learner update
        # (measured around RLlib's own timer blocks; RLlib's "timers" are moving averages).
        "sample_seconds": times.get("sample") if times else float("nan"),
        "learn_seconds": times.get("learn") if times else float("nan"),
        "iteration_seconds": seconds,
    }


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) PPO until ``cfg.ppo.env_steps``; checkpoint, metrics and curve in ``cfg.out``,
    and a wandb run (job_type ``finetune-<variant>``, step: env steps) that ends with the curve.
    A pretrain folder without checkpoints fails before Ray starts and before ``cfg.out`` is written."""
    if not cfg.scratch:
        pretrain_checkpoints(cfg.pretrain)
    init_ray()
    out = cfg.out
    storage.makedirs(out)
    variant = "scratch" if cfg.scratch else ("rl+sl" if cfg.ppo.decoder_sl else "rl")
    storage.write_json(storage.join(out, "config.json"), {"variant": variant, **dataclasses.asdict(cfg)})
    with WandbRun(cfg.wandb, out, f"finetune-{variant}", dataclasses.asdict(cfg)) as wb:
        summary, trained = _finetune(cfg, out, variant, wb)
        _plot(out, variant)
        if trained:
            wb.log_images([storage.join(out, "plots", "return.png")])
    return summary


def _finetune(cfg: FinetuneConfig, out: str, variant: str, wb: WandbRun) -> tuple[dict[str, Any], bool]:
    """The PPO iterations; returns the summary and whether any ran."""
    algo = build_algorithm_config(cfg).build_algo()
    try:
        steps, it, row = 0, 0, {}
        if _restore(algo, out):
            steps, it = sampled_env_steps(algo), algo.iteration
            print(f"finetune: resumed from {storage.join(out, CHECKPOINT_DIR)} at {steps} env steps", flush=True)
        it0 = it
        times = IterationTimes(algo)  # after the restore, which may rebuild the metrics logger
        sink = MetricsSink(out, f"finetune-{variant}", wb)
        progress = Progress(cfg.ppo.env_steps - steps, f"finetune {variant} {cfg.env.game}", unit="steps",
                            interval=10)
        while steps < cfg.ppo.env_steps:
            t0 = time.perf_counter()
            times.reset()
            result = algo.train()
            row = iteration_metrics(result, cfg.env.game, time.perf_counter() - t0, steps, times)
            row["healthy_env_runners"] = algo.env_runner_group.num_healthy_remote_workers()
            telemetry.count("env_steps", row["env_steps"] - steps, {"component": f"ppo-{variant}"})
            telemetry.gauge("env_steps_per_s", row["env_steps_per_s"], {"component": f"ppo-{variant}"})
            it += 1
            progress.update(row["env_steps"] - steps,
                            extra=f"return {row['episode_return']:.2f} (norm {row['episode_return_norm']:.2f}), "
                                  f"decoder acc {row['decoder_accuracy']:.2f}")
            steps = row["env_steps"]
            sink.log({"step": steps, "iteration": it, **row})
            if steps >= cfg.ppo.env_steps or it % cfg.checkpoint_every == 0:
                _save(algo, out)
        progress.print()
    finally:
        algo.stop()
    return {"out": out, "variant": variant, "env_steps": steps, **row}, it > it0


def _plot(out: str, variant: str) -> None:
    rows = read_metrics(out)
    plot_return_curves({variant: rows}, storage.join(out, "plots", "return.png"))
