"""The data-parallel training loop that stages 1 and 2 share, run by every Ray Train worker.

What differs between the stages lives in a ``StageTask`` (build the model, compute the loss,
evaluate); everything else is here once: sharded input from Ray Data, DDP, the LAPO learning-rate
schedule, bf16 autocast, time budget, metrics, checkpoints and resuming after a restart.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist

from lapo_ray import telemetry
from lapo_ray.config import PipelineConfig, StageConfig
from lapo_ray.train.checkpoint import Checkpoint, load_weights, save_checkpoint
from lapo_ray.train.step import StageStep, compile_model, lr_factor, make_optimizer, to_channels_last, use_bf16

__all__ = ["StageTask", "lr_factor", "run_stage", "use_bf16"]


class StageTask(Protocol):
    name: str

    def build(self) -> torch.nn.Module: ...

    def batches(self, ds, batch_size: int, pipe: PipelineConfig, drop_last: bool, epoch: int,
                device: torch.device | None = None) -> Iterator[dict]:
        """torch batches of this stage's input from a dataset or a Ray Train shard, on ``device``
        (copied from pinned memory ahead of use where that is a GPU); ``None``: the CPU. A task
        that can hold its input on the device (``--data.device-resident``) also has
        ``hold_on_device(shard, pipe, device)``, whose result its ``batches`` takes as ``ds``."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss of one batch, plus scalar metrics to average over the report window, as
        0-d tensors on the batch's device (never read back here: the loop sums them there)."""

    def validate(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Metrics on held-out batches (model in eval mode, no grad)."""

    def extra_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """Costly metrics computed on rank 0 only at each report (e.g. the probe)."""


@dataclass
class _Window:
    """Timings between two reports (the metrics accumulate on the device, in ``StageStep``)."""

    start: float
    steps: int = 0
    wait: float = 0.0


_host_group = None


def _all_reduce(value: float, world: int, op: str) -> float:
    """All-reduce a host-side number (has a batch, over budget) over the ranks. Under NCCL it goes
    through a gloo group of its own: NCCL wants a CUDA tensor, and reading one back would make the
    host wait for every queued GPU step, the very sync the step avoids."""
    if world == 1:
        return value
    global _host_group
    if _host_group is None and dist.get_backend() != "gloo":
        _host_group = dist.new_group(backend="gloo")
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=_host_group)
    return float(t.item())


def _all_reduce_max(value: float, world: int) -> float:
    return _all_reduce(value, world, "MAX")


def _all_reduce_min(value: float, world: int) -> float:
    return _all_reduce(value, world, "MIN")


def _batches_forever(task: StageTask, shard, batch_size: int, pipe: PipelineConfig, start_epoch: int,
                     world: int, device: torch.device | None = None,
                     skip: int = 0) -> Iterator[tuple[int, int, dict]]:
    """Endless (epoch, batches so far in that epoch, batch) triples. Ranks may hold a few batches
    more or fewer per epoch (the split is equal in segments, not triplets), and a rank that ran
    dry while the others still waited in DDP's all-reduce would hang the group: so every step the
    ranks agree (all-reduce MIN) that each has a batch, and all start the next epoch together
    otherwise.

    ``skip``: batches of the first epoch that a restarted run had already trained on before its
    checkpoint; they are cut and dropped, so the run goes on where it stopped instead of seeing
    them twice. That is exact where the split is (shard locality off: blocks go out in the
    dataset's order) and keeps the epoch's length otherwise."""
    epoch = start_epoch
    while True:
        n = 0
        it = iter(task.batches(shard, batch_size, pipe, True, epoch, device=device))
        while True:
            batch = next(it, None)
            if _all_reduce_min(float(batch is not None), world) == 0.0:
                break
            n += 1
            if epoch == start_epoch and n <= skip:
                continue
            yield epoch, n, batch
        if n == 0:
            raise RuntimeError(
                f"the training split yields no full batch of {batch_size} per worker; "
                "use a smaller batch size, fewer workers or a larger corpus"
            )
        epoch += 1


def _data_parallel(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """Wrap in DDP. The VQ codebook keeps itself in sync (its EMA statistics are all-reduced in
    forward), so DDP need not broadcast buffers, which would otherwise replace every rank's
    codebook update with rank 0's. BatchNorm layers are the exception: on GPU they become
    SyncBatchNorm; on CPU, where SyncBatchNorm does not run, rank 0's running statistics are
    broadcast (the batch statistics stay per rank; the ``cpu`` preset uses GroupNorm instead)."""
    import ray.train.torch  # lazy: jobs import this before they check their input (architecture.md, Imports)

    device = ray.train.torch.get_device()
    if world == 1:
        return model.to(device)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        has_bn = False
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": has_bn})


@dataclass
class _Position:
    """Where the run stands: what a checkpoint's ``state.json`` holds and a restart resumes."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # batches of ``epoch`` already trained
    train_seconds: float = 0.0
    resumed_from: int = -1  # the checkpoint's step, -1 for a fresh run


def run_stage(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``. ``config`` holds ``task`` (a StageTask),
    ``stage`` (StageConfig), ``pipeline`` (PipelineConfig), ``run_config`` (the resolved
    PretrainConfig as a dict, stored in every checkpoint) and, optionally, ``sink`` (rank 0's
    metrics)."""
    # lazy: jobs import this before they check their input (architecture.md, Imports)
    import ray.train
    import ray.train.torch

    task: StageTask = config["task"]
    cfg: StageConfig = config["stage"]
    pipe: PipelineConfig = config["pipeline"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sink = config.get("sink") if rank == 0 else None
    # Ray Train points the worker's root logger at the console at INFO, and its line for every
    # report (all metrics, the checkpoint's path) comes from a logger outside ``ray.train``, so
    # RunConfig's LoggingConfig does not reach it; this worker's own lines are prints.
    logging.getLogger().setLevel(logging.WARNING)
    _seed_and_threads(cfg, ctx.get_local_world_size())

    device = ray.train.torch.get_device()
    # On the device before the optimiser exists, so a resumed optimiser state lands there too.
    model = to_channels_last(task.build()).to(device)
    optimizer = make_optimizer(model, cfg, device)
    pos = _resume(task, model, optimizer, rank, sink)
    train_step = StageStep(task, model, optimizer, cfg, device, train_model=_training_model(model, cfg, world))
    local_bs = cfg.batch_size // world
    val_batches = _validation_batches(task, cfg, pipe, local_bs, device)
    batches = _batches_forever(task, _training_shard(task, pipe, device), local_bs, pipe, pos.epoch, world,
                               device, skip=pos.epoch_step)
    budget_s = cfg.time_budget_min * 60.0 if cfg.time_budget_min > 0 else math.inf

    window = _Window(start=time.perf_counter())
    stop = pos.step >= cfg.steps
    while not stop:
        t0 = time.perf_counter()
        pos.epoch, pos.epoch_step, batch = next(batches)
        t1 = time.perf_counter()
        train_step({k: v.to(device, non_blocking=True) for k, v in batch.items()}, pos.step)
        pos.step += 1
        pos.train_seconds += time.perf_counter() - t0
        window.steps += 1
        window.wait += t1 - t0
        telemetry.count("train_samples", local_bs, {"stage": task.name})

        stop = pos.step >= cfg.steps or _over_budget(pos, budget_s, world)
        if stop or pos.step % cfg.report_every == 0:
            out = _window_metrics(task, model, train_step, val_batches, cfg, pos, window, world, rank, stop)
            _log_and_report(out, task, model, optimizer, cfg, pos, sink, rank, stop, config["run_config"])
            if rank == 0:
                _print_progress(task.name, out, cfg, pos, budget_s)
            window = _Window(start=time.perf_counter())
    if sink is not None:
        sink.finish()


def _seed_and_threads(cfg: StageConfig, workers_on_node: int) -> None:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # Intra-op threads: the node's cores shared among its workers. Ray Data's reads need little
    # CPU next to a CPU training step, so a worker holding 1 logical CPU may still use 2 cores.
    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // workers_on_node))


def _resume(task: StageTask, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
            sink) -> _Position:
    """Load Ray Train's latest checkpoint into ``model`` and ``optimizer``, if there is one, and
    rewind rank 0's metrics to its step: rows past it belong to steps that run again."""
    import ray.train  # lazy: jobs import this before they check their input (architecture.md, Imports)

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return _Position()
    with checkpoint.as_directory() as d:
        load_weights(d, model, optimizer)
        state = Checkpoint(d).state
    # The epoch fields are optional (a state.json without them resumes at epoch 0), so every
    # checkpoint on disk can resume its run.
    pos = _Position(step=state["step"], epoch=state.get("epoch", 0), epoch_step=state.get("epoch_step", 0),
                    train_seconds=state.get("train_seconds", 0.0), resumed_from=state["step"])
    if rank == 0:
        print(f"[{task.name}] resuming from checkpoint at step {pos.step}", flush=True)
    if sink is not None:
        dropped = sink.rewind(pos.step)
        if dropped:
            print(f"[{task.name}] dropped {dropped} metrics row(s) past step {pos.step}: those steps run again",
                  flush=True)
    return pos


def _training_shard(task: StageTask, pipe: PipelineConfig, device: torch.device):
    """This rank's training shard: streamed, or read once and held on ``device`` when
    ``--data.device-resident`` asks it of a task that can (stage 2 streams)."""
    import ray.train  # lazy: jobs import this before they check their input (architecture.md, Imports)

    shard = ray.train.get_dataset_shard("train")
    hold = getattr(task, "hold_on_device", None)
    return hold(shard, pipe, device) if pipe.device_resident and hold is not None else shard


def _training_model(model: torch.nn.Module, cfg: StageConfig, world: int):
    """What the step calls: ``model`` under DDP, compiled if asked. The step keeps ``model``
    itself for the optimiser, evaluation and checkpoints."""
    ddp_model = _data_parallel(model, world)
    return compile_model(ddp_model, cfg.compile_mode) if cfg.compile else ddp_model


def _validation_batches(task: StageTask, cfg: StageConfig, pipe: PipelineConfig, batch_size: int,
                        device: torch.device) -> list[dict]:
    """The first ``cfg.val_batches`` batches of this rank's validation shard, unshuffled, read
    once and kept, so every report scores the same triplets."""
    import ray.train  # lazy: jobs import this before they check their input (architecture.md, Imports)

    if cfg.val_batches <= 0:
        return []
    eval_pipe = PipelineConfig(local_shuffle_buffer=0, segments_per_block=pipe.segments_per_block)
    batches = task.batches(ray.train.get_dataset_shard("val"), batch_size, eval_pipe, False, 0, device=device)
    return list(itertools.islice(batches, cfg.val_batches))


def _over_budget(pos: _Position, budget_s: float, world: int) -> bool:
    """Whether the time budget is spent, agreed by all ranks (any rank's clock counts). The ranks
    agree every 10 steps, all at the same steps: a collective that one rank entered alone would
    pair with another rank's next all-reduce and desynchronise the group."""
    if world > 1 and pos.step % 10 != 0:
        return False
    return _all_reduce_max(float(pos.train_seconds >= budget_s), world) > 0


def _window_metrics(task: StageTask, model: torch.nn.Module, train_step: StageStep, val_batches: list[dict],
                    cfg: StageConfig, pos: _Position, window: _Window, world: int, rank: int,
                    stop: bool) -> dict[str, Any]:
    """The report row: the window's training means, validation, rank 0's extra metrics, rates."""
    # The one host sync of a report window: it also waits for the window's queued GPU work, so
    # the rates below are true ones.
    out = {f"train/{k}": v for k, v in train_step.take_means().items()}
    elapsed = time.perf_counter() - window.start
    local_bs = cfg.batch_size // world
    telemetry.gauge("train_samples_per_s", window.steps * local_bs / elapsed,
                    {"stage": task.name, "rank": str(rank)})
    device = train_step.device
    model.eval()
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=train_step.bf16):
        val = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in val_batches]
        out.update({f"val/{k}": v for k, v in task.validate(model, val).items()} if val else {})
    if rank == 0:
        out.update(task.extra_metrics(model))
    out.update({
        "step": pos.step, "epoch": pos.epoch, "lr": cfg.lr * lr_factor(pos.step - 1, cfg),
        "samples_per_s": window.steps * cfg.batch_size / elapsed,
        "samples_per_s_per_worker": window.steps * local_bs / elapsed,
        "data_wait_frac": window.wait / elapsed, "train_seconds": pos.train_seconds,
        "world_size": world, "resumed_from_step": pos.resumed_from, "done": stop,
        "stop_reason": ("steps" if pos.step >= cfg.steps else "time_budget") if stop else "",
    })
    return out


def _log_and_report(out: dict[str, Any], task: StageTask, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, cfg: StageConfig, pos: _Position, sink, rank: int,
                    stop: bool, run_config: dict[str, Any]) -> None:
    """Log the row, then hand it to Ray Train, with rank 0's checkpoint when one is due."""
    import ray.train  # lazy: jobs import this before they check their input (architecture.md, Imports)

    # Logged before the report that may carry a checkpoint: a group that dies between the two
    # leaves a row past its last checkpoint, which the restart rewinds; the other order could
    # leave a checkpoint without its row, a hole in the metrics.
    if sink is not None:
        sink.log(out)
    if rank != 0 or not (stop or pos.step % cfg.checkpoint_every == 0):
        ray.train.report(out)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, optimizer,
                        {"step": pos.step, "epoch": pos.epoch, "epoch_step": pos.epoch_step,
                         "train_seconds": pos.train_seconds, "stage": task.name, "done": stop},
                        run_config)
        ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d))


def _print_progress(name: str, out: dict[str, Any], cfg: StageConfig, pos: _Position, budget_s: float) -> None:
    steps_per_s = out["samples_per_s"] / cfg.batch_size
    eta = min((cfg.steps - pos.step) / steps_per_s, max(budget_s - pos.train_seconds, 0.0))
    losses = " ".join(f"{k}={v:.4g}" for k, v in out.items() if isinstance(v, float) and "/" in k)
    print(f"[{name}] step {pos.step}/{cfg.steps} ({100 * pos.step / cfg.steps:.0f}%) {losses} | "
          f"{steps_per_s:.2f} steps/s, {out['samples_per_s']:.0f} samples/s, "
          f"data wait {100 * out['data_wait_frac']:.0f}% | ETA {eta / 60:.1f} min", flush=True)
