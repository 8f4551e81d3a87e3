"""Speed of the stage-1 training step on one device, without Ray (``jobs/benchmark.py step``).

Times ``train.step.StageStep``, the code every Ray Train worker runs, on random uint8 triplets
already on the device, so the figure is the step's own ceiling: what the data pipeline must keep
up with. Imports PyTorch, config, models and the step only, for machines that have nothing else
(no Ray, no pyarrow: ``tests/test_step.py`` and ``tests/test_benchmarks.py`` check it).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from lapo_ray.config import PRETRAIN_PRESETS, StepBenchConfig
from lapo_ray.train.stages import Stage1Task
from lapo_ray.train.step import StageStep, compile_model, make_optimizer, to_channels_last

# Dense peak FLOP/s per precision (vendor figures, no sparsity), matched on the device name. fp32
# is the plain (non-tensor-core) rate; convolutions may run on TF32 tensor cores above it.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def step_flops(task: Stage1Task, model: torch.nn.Module, frames: torch.Tensor) -> int:
    """FLOPs of one forward and backward pass (matmuls and convolutions, as
    ``torch.utils.flop_counter`` counts them; the optimiser's elementwise work is not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = task.loss(model, {"frames": frames})
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(preset: str = "paper", device: str = "cpu", batch_sizes=(64, 128, 256),
               precisions=("fp32", "bf16"), steps: int = 50, warmup: int = 10, compile: bool = False,
               compile_mode: str = "default", peak_tflops: float | None = None) -> dict[str, Any]:
    """Samples/s, step time, peak memory and MFU of the stage-1 step for each batch and precision.

    Peak memory is the device's allocator peak on GPUs and the process's peak resident set on
    CPUs (which never goes down, so later rows include earlier ones)."""
    dev = torch.device(device)
    cfg = PRETRAIN_PRESETS[preset]()
    rows = []
    for precision in precisions:
        for batch_size in batch_sizes:
            stage = dataclasses.replace(cfg.stage1, precision=precision, batch_size=batch_size,
                                        steps=warmup + steps, compile=compile, compile_mode=compile_mode)
            torch.manual_seed(0)
            task = Stage1Task(cfg.model)
            model = to_channels_last(task.build()).to(dev)
            optimizer = make_optimizer(model, stage, dev)
            train_model = compile_model(model, compile_mode) if compile else model
            step = StageStep(task, model, optimizer, stage, dev, train_model=train_model)
            g = torch.Generator().manual_seed(0)
            frames = [torch.randint(0, 256, (batch_size, 3, cfg.model.frame_size, cfg.model.frame_size,
                                             cfg.model.channels), dtype=torch.uint8, generator=g).to(dev)
                      for _ in range(4)]
            flops = step_flops(task, model, frames[0])
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t_first = time.perf_counter()
            for i in range(warmup):
                step({"frames": frames[i % len(frames)]}, i)
            _sync(dev)
            first_s = time.perf_counter() - t_first
            t0 = time.perf_counter()
            for i in range(warmup, warmup + steps):
                step({"frames": frames[i % len(frames)]}, i)
            loss = step.take_means()["loss"]  # also the sync that ends the timed steps
            _sync(dev)
            seconds = time.perf_counter() - t0
            peak_mem = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            achieved = flops * steps / seconds
            peak = peak_tflops * 1e12 if peak_tflops else peak_flops(dev, precision)
            rows.append({
                "precision": precision, "batch_size": batch_size, "samples_per_s": batch_size * steps / seconds,
                "step_ms": 1000 * seconds / steps, "warmup_s": first_s, "peak_memory_mib": peak_mem / 2**20,
                "gflop_per_sample": flops / batch_size / 1e9, "tflop_per_s": achieved / 1e12,
                "mfu": achieved / peak if peak else None, "loss": loss,
            })
            del model, optimizer, step, train_model, frames
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"preset": preset, "device": name, "steps": steps, "warmup": warmup, "compile": compile,
            "compile_mode": compile_mode, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rows": rows}


def format_rows(result: dict[str, Any]) -> str:
    lines = [f"stage-1 step, {result['preset']} preset on {result['device']} (torch {result['torch']}, "
             f"{result['threads']} threads), compile={result['compile']}, {result['steps']} timed steps after "
             f"{result['warmup']} warm-up steps",
             f"{'precision':>9} {'batch':>5} {'samples/s':>10} {'step ms':>8} {'peak MiB':>9} "
             f"{'GFLOP/smp':>9} {'TFLOP/s':>8} {'MFU':>6}"]
    for r in result["rows"]:
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        lines.append(f"{r['precision']:>9} {r['batch_size']:>5} {r['samples_per_s']:>10,.1f} {r['step_ms']:>8.1f} "
                     f"{r['peak_memory_mib']:>9,.0f} {r['gflop_per_sample']:>9.2f} {r['tflop_per_s']:>8.3f} {mfu}")
    return "\n".join(lines)


def run(cfg: StepBenchConfig) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return bench_step(cfg.preset, cfg.device, cfg.batch_sizes, cfg.precisions, cfg.steps, cfg.warmup, cfg.compile,
                      cfg.compile_mode, cfg.peak_tflops)


def report(r: dict[str, Any]) -> str:
    """What ``jobs/benchmark.py step`` prints: the figures as JSON, then a line a row."""
    return f"{json.dumps(r, indent=2)}\n\n{format_rows(r)}"
