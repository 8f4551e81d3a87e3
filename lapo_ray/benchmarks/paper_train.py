"""Training in the paper-scale command (``benchmarks.paper``): stage 1 and the supervised ceiling
on one device, from the corpus held there, with the library's own step (``train.step.StageStep``:
its lr schedule, bf16 autocast, clipping and AdamW, no host sync inside a step).

The stage-1 step is first timed alone (warm-up with compilation, then a timed window), and both
models go back to their initial weights and optimiser state before training starts, so training
runs the same schedule from step 0 as if the window had not been there, while the compiled code is
kept. Then the two step in lockstep on the same batches (the pretrain pipeline trains the ceiling
on stage 1's data, batch size and steps), or the ceiling after stage 1, until the planned steps or
the deadline.
"""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from lapo_ray.benchmarks.step import peak_flops, step_flops
from lapo_ray.config import StageConfig
from lapo_ray.data.resident import ResidentTriplets
from lapo_ray.train.step import StageStep, compile_model, make_optimizer, to_channels_last


@dataclass
class Trainee:
    """One model being trained: its task, module, step and how compilation went."""

    name: str
    task: Any
    model: torch.nn.Module
    step: StageStep
    steps_done: int = 0
    compile: dict[str, Any] = field(default_factory=dict)


def make_trainee(name: str, task, stage: StageConfig, device: torch.device, compile: bool) -> Trainee:
    torch.manual_seed(stage.seed)  # the pipeline's initial weights: the floor of the probe is stage 1's start
    model = to_channels_last(task.build()).to(device)
    optimizer = make_optimizer(model, stage, device)
    train_model = compile_model(model, stage.compile_mode) if compile else model
    return Trainee(name, task, model, StageStep(task, model, optimizer, stage, device, train_model=train_model),
                   compile={"asked": compile, "used": compile, "error": None})


def guarded_step(t: Trainee, batch: dict[str, torch.Tensor], i: int) -> None:
    """One step; a compiled model that fails to compile falls back to eager, the error recorded:
    one failure must not cost a GPU window (torch.compile of this model is yet to run on a GPU)."""
    if t.compile["used"] and t.compile.get("checked") is None:
        try:
            t.step(batch, i)
            t.compile["checked"] = True
            return
        except Exception as e:  # Inductor and Dynamo raise many kinds; anything here means eager
            t.compile.update(used=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            print(f"[{t.name}] torch.compile failed, training eagerly: {t.compile['error']}", flush=True)
            traceback.print_exc(limit=3)
            t.step.train_model = t.model
    t.step(batch, i)


def endless(resident: ResidentTriplets, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Epoch after epoch of full batches, epoch e shuffled by ``seed + e`` as the stage loop does."""
    epoch = 0
    while True:
        yield from resident.batches(batch_size, seed=seed + epoch, drop_last=True)
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state(t: Trainee) -> dict[str, Any]:
    return copy.deepcopy({"model": t.model.state_dict(), "optimizer": t.step.optimizer.state_dict()})


def _restore(t: Trainee, state: dict[str, Any]) -> None:
    t.model.load_state_dict(state["model"])  # in place: the compiled graph keeps its parameters
    t.step.optimizer.load_state_dict(state["optimizer"])
    t.step.take_means()
    t.steps_done = 0


def time_alone(t: Trainee, batches: Iterator[dict], warmup: int, steps: int, with_flops: bool) -> dict[str, Any]:
    """Warm-up (compilation) and a timed window of ``t`` alone, then ``t`` back at its start.
    Samples/s, step time, peak device memory so far (the corpus held there included) and, with
    ``with_flops``, FLOPs and MFU."""
    device, batch_size = t.step.device, t.step.cfg.batch_size
    start = _state(t)
    flops = step_flops(t.task, t.model, next(batches)["frames"]) if with_flops else None
    t0 = time.perf_counter()
    for i in range(warmup):
        guarded_step(t, next(batches), i)
    sync(device)
    t1 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        t.step(next(batches), i)
    t.step.take_means()  # the window's one host read
    sync(device)
    seconds = time.perf_counter() - t1
    _restore(t, start)
    return _timing(t, flops, warmup, steps, t1 - t0, seconds, batch_size)


def _timing(t: Trainee, flops: int | None, warmup: int, steps: int, warmup_s: float, seconds: float,
            batch_size: int) -> dict[str, Any]:
    device = t.step.device
    achieved = flops * steps / seconds if flops is not None else None
    peak = peak_flops(device, "bf16" if t.step.bf16 else "fp32")
    return {"warmup_steps": warmup, "warmup_seconds": warmup_s, "timed_steps": steps,
            "samples_per_s": batch_size * steps / seconds, "step_ms": 1000 * seconds / steps,
            "gflop_per_sample": flops / batch_size / 1e9 if flops is not None else None,
            "tflop_per_s": achieved / 1e12 if achieved is not None else None,
            "mfu": achieved / peak if achieved is not None and peak else None,
            "peak_tflop_per_s": peak / 1e12 if peak else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "precision": "bf16" if t.step.bf16 else "fp32", "compile": dict(t.compile)}


@dataclass
class Lockstep:
    """Trainees stepping together on the same batches until ``steps`` or ``deadline`` (a
    ``time.monotonic`` time); ``every(step)`` runs after each step (probes, progress)."""

    trainees: list[Trainee]
    steps: int
    deadline: float
    every: Callable[[int], None] = lambda step: None

    def run(self, batches: Iterator[dict]) -> dict[str, Any]:
        done = min(t.steps_done for t in self.trainees)
        t0 = time.perf_counter()
        start = done
        while done < self.steps and time.monotonic() < self.deadline:
            batch = next(batches)
            for t in self.trainees:
                if t.steps_done == done:
                    guarded_step(t, batch, done)
                    t.steps_done += 1
            done += 1
            self.every(done)
        sync(self.trainees[0].step.device)
        seconds = time.perf_counter() - t0
        return {"steps": done - start, "seconds": seconds,
                "stop_reason": "steps" if done >= self.steps else "time limit"}
