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
from lapo_ray.train.checkpoint import load_checkpoint, save_checkpoint


class StageTask(Protocol):
    name: str

    def build(self) -> torch.nn.Module: ...

    def batches(self, ds, batch_size: int, pipe: PipelineConfig, drop_last: bool, epoch: int) -> Iterator[dict]:
        """torch batches of this stage's input from a dataset or a Ray Train shard."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss of one batch, plus scalar metrics to average over the report window."""

    def validate(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Metrics on held-out batches (model in eval mode, no grad)."""

    def extra_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """Costly metrics computed on rank 0 only at each report (e.g. the probe)."""


def use_bf16(cfg: StageConfig, device: torch.device) -> bool:
    """Whether to autocast to bf16. On a CPU without native bf16 (e.g. AVX2 only) autocast
    emulates it and a stage-1 step gets several times slower, so "auto" keeps fp32 there."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def lr_factor(step: int, cfg: StageConfig) -> float:
    """Linear warm-up from 0.1 to 1, then linear decay to ``final_lr_frac`` (official LAPO)."""
    if step < cfg.warmup_steps:
        return 0.1 + 0.9 * step / max(1, cfg.warmup_steps)
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 1.0 + (cfg.final_lr_frac - 1.0) * min(frac, 1.0)


@dataclass
class _Window:
    """Accumulates timings and metrics between two reports."""

    start: float
    steps: int = 0
    wait: float = 0.0
    sums: dict[str, float] | None = None

    def add(self, metrics: dict[str, float]) -> None:
        self.sums = self.sums or {}
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in (self.sums or {}).items()}


def _all_reduce(value: float, world: int, op: str) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return float(t.item())


def _all_reduce_max(value: float, world: int) -> float:
    return _all_reduce(value, world, "MAX")


def _all_reduce_min(value: float, world: int) -> float:
    return _all_reduce(value, world, "MIN")


def _batches_forever(task: StageTask, shard, batch_size: int, pipe: PipelineConfig, start_epoch: int,
                     world: int) -> Iterator[tuple[int, dict]]:
    """Endless (epoch, batch) pairs. Ranks may hold a few batches more or fewer per epoch (the
    split is equal in segments, not triplets), and a rank that ran dry while the others still
    waited in DDP's all-reduce would hang the group: so every step the ranks agree (all-reduce
    MIN) that each has a batch, and all start the next epoch together otherwise."""
    epoch = start_epoch
    while True:
        n = 0
        it = iter(task.batches(shard, batch_size, pipe, True, epoch))
        while True:
            batch = next(it, None)
            if _all_reduce_min(float(batch is not None), world) == 0.0:
                break
            n += 1
            yield epoch, batch
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

    model = task.build().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, epoch, train_seconds, resumed_from = 0, 0, 0.0, -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, model, optimizer)
        step, epoch, train_seconds = state["step"], state.get("epoch", 0), state.get("train_seconds", 0.0)
        resumed_from = step
        if rank == 0:
            print(f"[{task.name}] resuming from checkpoint at step {step}", flush=True)
    ddp_model = _data_parallel(model, world)
    device = ray.train.torch.get_device()

    local_bs = cfg.batch_size // world
    val_batches = []
    if cfg.val_batches > 0:
        val_shard = ray.train.get_dataset_shard("val")
        eval_pipe = PipelineConfig(local_shuffle_buffer=0, segments_per_block=pipe.segments_per_block)
        for i, b in enumerate(task.batches(val_shard, local_bs, eval_pipe, False, 0)):
            val_batches.append(b)
            if i + 1 >= cfg.val_batches:
                break
    batches = _batches_forever(task, ray.train.get_dataset_shard("train"), local_bs, pipe, epoch, world)
    autocast = use_bf16(cfg, device)
    budget_s = cfg.time_budget_min * 60.0 if cfg.time_budget_min > 0 else math.inf

    window = _Window(start=time.perf_counter())
    stop = step >= cfg.steps
    while not stop:
        t0 = time.perf_counter()
        epoch, batch = next(batches)
        t1 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        ddp_model.train()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, metrics = task.loss(ddp_model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        t2 = time.perf_counter()
        train_seconds += t2 - t0
        window.steps += 1
        window.wait += t1 - t0
        window.add({**metrics, "grad_norm": float(grad_norm)})
        telemetry.count("train_samples", local_bs, {"stage": task.name})

        over_budget = train_seconds >= budget_s
        if step % 10 == 0 or over_budget:
            over_budget = _all_reduce_max(float(over_budget), world) > 0
        stop = step >= cfg.steps or over_budget
        is_report = stop or step % cfg.report_every == 0
        if not is_report:
            continue

        elapsed = time.perf_counter() - window.start
        telemetry.gauge("train_samples_per_s", window.steps * local_bs / elapsed,
                        {"stage": task.name, "rank": str(rank)})
        out = {f"train/{k}": v for k, v in window.means().items()}
        model.eval()
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            val = [{k: v.to(device) for k, v in b.items()} for b in val_batches]
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
        is_ckpt = stop or step % cfg.checkpoint_every == 0
        if is_ckpt and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, optimizer,
                                {"step": step, "epoch": epoch, "train_seconds": train_seconds, "stage": task.name,
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
            if sink is not None:
                sink.log(out)
        window = _Window(start=time.perf_counter())
    if sink is not None:
        sink.finish()
