"""Driver side of stages 1 and 2: one ``TorchTrainer`` per stage over Ray Data shards."""

from __future__ import annotations

import contextlib
from typing import Any

from lapo_ray import storage
from lapo_ray.config import PipelineConfig, StageConfig
from lapo_ray.runtime import check_cpu_budget, check_spread
from lapo_ray.train.checkpoint import Checkpoint
from lapo_ray.train.loop import StageTask, run_stage
from lapo_ray.train.metrics import MetricsSink, WandbRun


def fit_stage(task: StageTask, cfg: StageConfig, pipe: PipelineConfig, train_ds, val_ds,
              out_uri: str, run_config: dict[str, Any], sink: MetricsSink | None = None):
    """Train ``task`` data-parallel on ``cfg.num_workers`` workers and return the Ray Train Result.

    Checkpoints go to ``<out_uri>/<task.name>/checkpoint_*``. Ray Train restores the run's state
    from that folder, so running the same stage again into the same artifact folder continues
    from its latest checkpoint instead of starting over; a worker that dies restarts the group
    from the last checkpoint up to ``cfg.max_failures`` times.
    """
    # lazy: jobs import this before they check their input (architecture.md, Imports)
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    check_cpu_budget(task.name, cfg.num_workers, cfg.cpus_per_worker,
                     f"lower --{task.name}.num-workers or --{task.name}.cpus-per-worker, or add CPUs")
    if cfg.placement_strategy == "STRICT_SPREAD":
        check_spread(task.name, cfg.num_workers, cfg.cpus_per_worker, 1.0 if cfg.use_gpu else 0.0,
                     f"lower --{task.name}.num-workers, add nodes, or use --{task.name}.placement-strategy SPREAD")
    fs, path = storage.resolve(out_uri)
    trainer = TorchTrainer(
        run_stage,
        train_loop_config={"task": task, "stage": cfg, "pipeline": pipe, "run_config": run_config, "sink": sink},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=task.name,
            storage_path=path,
            storage_filesystem=None if storage.is_local(out_uri) else fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's INFO lines (state transitions, every report) go to its log files only.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": train_ds, "val": val_ds},
        # Validation batches are the same on every rank; only the training set is split. Ray Train
        # would run both with the driver's default execution options, dropping the datasets' own
        # (``triplet_dataset`` keeps blocks in the plan's order); with them, and without shard
        # locality, the split hands every worker the same blocks on every run.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"], enable_shard_locality=cfg.shard_locality,
            execution_options={"train": train_ds.context.execution_options, "val": val_ds.context.execution_options}),
    )
    return trainer.fit()


def fit_into(folder: str, task: StageTask, cfg: StageConfig, pipe: PipelineConfig, train_ds, val_ds,
             run_config: dict[str, Any], wandb: WandbRun | None = None, metrics_path: str | None = None) -> Checkpoint:
    """Fit ``task`` into ``<folder>/<task.name>`` (resumed from the latest checkpoint there) with
    its metrics in ``<folder>/metrics.jsonl`` (or ``metrics_path``), which ``wandb``, when given,
    follows; returns the stage's latest checkpoint. A failed fit raises RuntimeError naming the
    stage: a failure inside Ray Train is lapo_ray's or the cluster's, not the user's input."""
    sink = MetricsSink(folder, task.name, path=metrics_path)
    with wandb.following(sink.path) if wandb is not None else contextlib.nullcontext():
        result = fit_stage(task, cfg, pipe, train_ds, val_ds, folder, run_config, sink)
    if result.error:
        raise RuntimeError(f"{task.name} failed: {result.error}")
    return Checkpoint.latest(storage.join(folder, task.name))
