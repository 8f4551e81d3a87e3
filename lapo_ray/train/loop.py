"""The data-parallel training loop that stages 1 and 2 share, run by every Ray Train worker.

What differs between the stages lives in a ``StageTask`` (build the model, compute the loss,
evaluate); everything else is here once: sharded input from Ray Data, DDP, the LAPO learning-rate
schedule, bf16 autocast, time budget, metrics, checkpoints and resuming after a restart.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

from lapo_ray import telemetry
from lapo_ray.config import PipelineConfig, StageConfig
from lapo_ray.train.step import StageStep, compile_model, lr_factor, make_optimizer, to_channels_last, use_bf16

__all__ = ["StageTask", "lr_factor", "run_stage", "use_bf16"]


class StageTask(Protocol):
    name: str

    def build(self) -> torch.nn.Module: ...

    def batches(self, ds, batch_size: int, pipe: PipelineConfig, drop_last: bool, epoch: int,
                device: torch.device | None = None) -> Iterator[dict]:
        """torch batches of this stage's input from a dataset or a Ray Train shard, on ``device``
        (copied from pinned memory ahead of use where that is a GPU); ``None``: the CPU."""

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
    import torch.distributed as dist

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
    import ray.train.torch

    device = ray.train.torch.get_device()
    if world == 1:
        return model.to(device)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        has_bn = False
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": has_bn})


def run_stage(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``. ``config`` holds ``task`` (a StageTask),
    ``stage`` (StageConfig), ``pipeline`` (PipelineConfig) and ``run_config`` (the resolved
    PretrainConfig as a dict, stored in every checkpoint)."""
    import ray.train
    import ray.train.torch

    from lapo_ray.train.checkpoint import load_checkpoint, save_checkpoint

    task: StageTask = config["task"]
    sink = config.get("sink") if ray.train.get_context().get_world_rank() == 0 else None
    cfg: StageConfig = config["stage"]
    pipe: PipelineConfig = config["pipeline"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # Intra-op threads: the node's cores shared among its workers. Ray Data's reads need little
    # CPU next to a CPU training step, so a worker holding 1 logical CPU may still use 2 cores.
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    torch.set_num_threads(threads)

    device = ray.train.torch.get_device()
    # On the device before the optimiser exists, so a resumed optimiser state lands there too.
    model = to_channels_last(task.build()).to(device)
    optimizer = make_optimizer(model, cfg, device)
    step, epoch, epoch_step, train_seconds, resumed_from = 0, 0, 0, 0.0, -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, model, optimizer)
        step, epoch, train_seconds = state["step"], state.get("epoch", 0), state.get("train_seconds", 0.0)
        epoch_step = state.get("epoch_step", 0)  # absent in checkpoints of earlier versions
        resumed_from = step
        if rank == 0:
            print(f"[{task.name}] resuming from checkpoint at step {step}", flush=True)
        if sink is not None:
            dropped = sink.rewind(step)
            if dropped:
                print(f"[{task.name}] dropped {dropped} metrics row(s) past step {step}: those steps run again",
                      flush=True)
    ddp_model = _data_parallel(model, world)
    train_model = compile_model(ddp_model, cfg.compile_mode) if cfg.compile else ddp_model
    train_step = StageStep(task, model, optimizer, cfg, device, train_model=train_model)

    local_bs = cfg.batch_size // world
    val_batches = []
    if cfg.val_batches > 0:
        val_shard = ray.train.get_dataset_shard("val")
        eval_pipe = PipelineConfig(local_shuffle_buffer=0, segments_per_block=pipe.segments_per_block)
        for i, b in enumerate(task.batches(val_shard, local_bs, eval_pipe, False, 0, device=device)):
            val_batches.append(b)
            if i + 1 >= cfg.val_batches:
                break
    batches = _batches_forever(task, ray.train.get_dataset_shard("train"), local_bs, pipe, epoch, world, device,
                               skip=epoch_step)
    autocast = train_step.bf16
    budget_s = cfg.time_budget_min * 60.0 if cfg.time_budget_min > 0 else math.inf

    window = _Window(start=time.perf_counter())
    stop = step >= cfg.steps
    while not stop:
        t0 = time.perf_counter()
        epoch, epoch_step, batch = next(batches)
        t1 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        train_step(batch, step)
        step += 1
        t2 = time.perf_counter()
        train_seconds += t2 - t0
        window.steps += 1
        window.wait += t1 - t0
        telemetry.count("train_samples", local_bs, {"stage": task.name})

        over_budget = train_seconds >= budget_s
        if step % 10 == 0 or over_budget:
            over_budget = _all_reduce_max(float(over_budget), world) > 0
        stop = step >= cfg.steps or over_budget
        is_report = stop or step % cfg.report_every == 0
        if not is_report:
            continue

        # The one host sync of a report window: it also waits for the window's queued GPU work,
        # so the rates below are true ones.
        out = {f"train/{k}": v for k, v in train_step.take_means().items()}
        elapsed = time.perf_counter() - window.start
        telemetry.gauge("train_samples_per_s", window.steps * local_bs / elapsed,
                        {"stage": task.name, "rank": str(rank)})
        model.eval()
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            val = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in val_batches]
            out.update({f"val/{k}": v for k, v in task.validate(model, val).items()} if val else {})
        if rank == 0:
            out.update(task.extra_metrics(model))
        out.update({
            "step": step, "epoch": epoch, "lr": cfg.lr * lr_factor(step - 1, cfg),
            "samples_per_s": window.steps * cfg.batch_size / elapsed,
            "samples_per_s_per_worker": window.steps * local_bs / elapsed,
            "data_wait_frac": window.wait / elapsed, "train_seconds": train_seconds,
            "world_size": world, "resumed_from_step": resumed_from, "done": stop,
            "stop_reason": ("steps" if step >= cfg.steps else "time_budget") if stop else "",
        })
        # Logged before the report that may carry a checkpoint: a group that dies between the two
        # leaves a row past its last checkpoint, which the restart rewinds; the other order could
        # leave a checkpoint without its row, a hole in the metrics.
        if sink is not None:
            sink.log(out)
        is_ckpt = stop or step % cfg.checkpoint_every == 0
        if is_ckpt and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, optimizer,
                                {"step": step, "epoch": epoch, "epoch_step": epoch_step,
                                 "train_seconds": train_seconds, "stage": task.name,
                                 "done": stop},
                                config["run_config"])
                ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(out)
        if rank == 0:
            steps_per_s = window.steps / elapsed
            eta = min((cfg.steps - step) / steps_per_s, max(budget_s - train_seconds, 0.0))
            print(f"[{task.name}] step {step}/{cfg.steps} ({100 * step / cfg.steps:.0f}%) "
                  + " ".join(f"{k}={v:.4g}" for k, v in out.items() if isinstance(v, float) and "/" in k)
                  + f" | {steps_per_s:.2f} steps/s, {out['samples_per_s']:.0f} samples/s, "
                  f"data wait {100 * out['data_wait_frac']:.0f}% | ETA {eta / 60:.1f} min",
                  flush=True)
        window = _Window(start=time.perf_counter())
    if sink is not None:
        sink.finish()
