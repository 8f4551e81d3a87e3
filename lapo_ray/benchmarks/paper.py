"""The paper-scale stage 1 as one prepared command, on one machine without Ray
(``jobs/benchmark.py paper``; docs/reproducing.md says how to run it on a lent GPU machine).

Its steps, each below by name: collect a corpus on the machine's cores with the experiment's recipe
(``paper_collect``), hold its training split on the device (``data.resident``, the path of
``--data.device-resident``), time the official LAPO step there (``official``), time stage 1
alone (``paper_train``: samples/s, FLOPs, MFU, peak memory), train stage 1 and the supervised
ceiling for the paper's budget or as much of it as the time limit allows, probe them at regular
steps (``paper_probe``), and write JSON and markdown (``paper_report``) as it goes. Everything is
the library's own: the step, the models, the corpus readers and the probe; nothing imports Ray
(``tests/test_paper.py`` runs it with Ray blocked).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import torch

from lapo_ray import UsageError
from lapo_ray.benchmarks.official import time_official_step
from lapo_ray.benchmarks.paper_collect import corpus_for
from lapo_ray.benchmarks.paper_probe import ProbeBook, probe_data
from lapo_ray.benchmarks.paper_report import (
    device_info,
    peak_memory,
    render_markdown,
    versions,
    with_every_figure,
    write_outputs,
)
from lapo_ray.benchmarks.paper_train import Lockstep, Trainee, endless, make_trainee, time_alone
from lapo_ray.config import PRETRAIN_PRESETS, PaperBenchConfig, PretrainConfig
from lapo_ray.data.resident import (
    ResidentTriplets,
    check_fits,
    device_memory,
    estimate_split_bytes,
    load_resident,
)
from lapo_ray.data.sources import CorpusSource
from lapo_ray.data.triplets import eval_pipeline
from lapo_ray.train.stages import Stage1Task, SupervisedIDMTask

PAPER_SAMPLES = 50_000 * 128  # the paper's stage-1 budget: 50k steps of 128
# Of the training time left after the timing windows, the share stage 1 gets when the ceiling
# trains after it (the ceiling's step is the IDM's alone, about a third of stage 1's FLOPs).
STAGE1_SHARE_WHEN_AFTER = 0.65


@dataclasses.dataclass
class Run:
    """What the steps share: the config, the device, the presets' configs, the clock, the result."""

    cfg: PaperBenchConfig
    device: torch.device
    pretrain: PretrainConfig
    started: float
    result: dict[str, Any]

    def save(self, status: str) -> None:
        self.result.update(status=status, wall_seconds=time.monotonic() - self.started,
                           peak_memory=peak_memory(self.device))
        write_outputs(self.cfg.out, self.result)

    def left(self) -> float:
        return self.started + 60 * self.cfg.time_limit_min - time.monotonic()


def run(cfg: PaperBenchConfig) -> dict[str, Any]:
    """Collect, hold, time, train, probe and write (see the module's doc); returns the result."""
    r = start(cfg)
    corpus, r.result["collection"] = corpus_for(cfg)
    r.result["notes"].append(r.result["collection"].get("note"))
    r.save("running: corpus ready")
    train, probe = hold_corpus(r, corpus)
    r.result["official_lapo_step"] = time_official_step(cfg.official_lapo, r.device, r.pretrain.stage1.batch_size)
    r.save("running: official step timed")
    stage1, ceiling = build_models(r, train)
    book = ProbeBook(probe, r.pretrain.probe, r.pretrain.model.vq.enabled, ceiling is not None) if probe else None
    if book is not None:
        book.record_floor(stage1.model)
    train_models(r, train, stage1, ceiling, book)
    r.result["probes"] = book.finish() if book is not None else []
    r.result["probe"] = r.result["probes"][-1] if r.result["probes"] else {}
    r.save("finished")
    return r.result


def start(cfg: PaperBenchConfig) -> Run:
    """The device, the preset's configs with the flags' changes, and the result's first entries."""
    cfg.validate()
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: this PyTorch sees no CUDA device")
    pretrain = PRETRAIN_PRESETS[cfg.preset]()
    compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    pretrain.stage1 = dataclasses.replace(pretrain.stage1, steps=cfg.steps or pretrain.stage1.steps,
                                          batch_size=cfg.batch_size or pretrain.stage1.batch_size, compile=compile)
    if cfg.probe_triplets:
        pretrain.probe = dataclasses.replace(pretrain.probe, triplets=cfg.probe_triplets)
    notes = [] if compile or device.type == "cuda" else [
        "torch.compile off: on CPU compiling the models takes minutes (--compile true turns it on)"]
    result = {"command": " ".join(["python", *sys.argv]), "config": dataclasses.asdict(cfg),
              "device": device_info(device), "software": versions(), "notes": notes}
    return Run(cfg, device, pretrain, time.monotonic(), result)


def hold_corpus(r: Run, corpus: str) -> tuple[ResidentTriplets, Any]:
    """The training split on the device, as --data.device-resident holds it (the split and file
    order of the pipeline's stage 1), and the probe's labelled validation triplets."""
    t0 = time.monotonic()
    src = CorpusSource(corpus)
    scan = src.scan()
    pipe, offset = r.pretrain.data, r.pretrain.model.frame_offset
    spec = src.split(scan, pipe.val_fraction, pipe.split_seed)
    # The check --data.device-resident makes before stage 1, so a corpus too large fails in one line.
    check_fits(estimate_split_bytes(scan, spec, "train", tuple(src.frame_shape)), *device_memory(r.device),
               int(pipe.resident_margin_gb * 2**30))
    train = load_resident(src, "train", pipe, scan.files, spec, r.device, offset, weighted=True)
    val = load_resident(src, "val", eval_pipeline(pipe), scan.files, spec, r.device, offset)
    probe = probe_data(val, r.pretrain.probe.triplets)
    del val
    r.result["corpus"] = {"path": corpus, "frames": scan.frames, "episodes": scan.episodes,
                          "train_triplets": len(train), "resident_gib": train.nbytes / 2**30,
                          "load_seconds": time.monotonic() - t0,
                          "probe_triplets": 0 if probe is None else len(probe.actions)}
    if probe is None:
        r.result["notes"].append("the probe was skipped: fewer than 32 labelled validation triplets")
    print(f"paper: {train.describe()}, loaded in {r.result['corpus']['load_seconds']:.0f}s", flush=True)
    r.save("running: corpus held on the device")
    return train, probe


def build_models(r: Run, train: ResidentTriplets) -> tuple[Trainee, Trainee | None]:
    """Stage 1 and the ceiling built, warmed up (compiled) and timed alone, back at their start."""
    stage, model_cfg = r.pretrain.stage1, r.pretrain.model
    before = torch.cuda.memory_allocated(r.device) if r.device.type == "cuda" else 0
    stage1 = make_trainee("stage1", Stage1Task(model_cfg), stage, r.device, stage.compile)
    timing = time_alone(stage1, endless(train, stage.batch_size, 10**6), r.cfg.warmup_steps, r.cfg.timing_steps, True)
    r.result["stage1"] = stage1_figures(r, timing)
    mode, why = ceiling_mode(r, timing, before)
    r.result["ceiling"] = {"mode": mode, "why": why}
    ceiling = None
    if mode != "off":
        ceiling = make_trainee("ceiling", SupervisedIDMTask(model_cfg), stage, r.device, stage.compile)
        alone = time_alone(ceiling, endless(train, stage.batch_size, 10**6), r.cfg.warmup_steps, r.cfg.timing_steps,
                           False)
        r.result["ceiling"].update(samples_per_s=alone["samples_per_s"], compile_used=alone["compile"]["used"])
    r.save("running: models timed")
    return stage1, ceiling


def stage1_figures(r: Run, timing: dict[str, Any]) -> dict[str, Any]:
    stage = r.pretrain.stage1
    print(f"paper: stage 1 alone {timing['samples_per_s']:,.0f} samples/s, {timing['step_ms']:.1f} ms a step, "
          f"MFU {timing['mfu'] if timing['mfu'] is not None else 'n/a'}", flush=True)
    return {"preset": r.cfg.preset, "batch_size": stage.batch_size, "steps_planned": stage.steps,
            "precision": timing["precision"], "compile_used": timing["compile"]["used"],
            "compile_error": timing["compile"]["error"], "warmup_seconds": timing["warmup_seconds"],
            "timing_peak_memory_gib": None if timing["peak_memory_bytes"] is None
            else timing["peak_memory_bytes"] / 2**30,
            **{k: timing[k] for k in ("samples_per_s", "step_ms", "gflop_per_sample", "tflop_per_s", "mfu",
                                      "peak_tflop_per_s")}}


def ceiling_mode(r: Run, timing: dict[str, Any], before: int) -> tuple[str, str]:
    """Concurrent when the device has room for a second working set as large as stage 1's."""
    asked = r.cfg.ceiling
    if asked != "auto":
        return asked, "asked"
    if r.device.type != "cuda":
        return "concurrent", "auto: host memory"
    need = timing["peak_memory_bytes"] - before
    free, _ = torch.cuda.mem_get_info(r.device)
    if free > need:
        return "concurrent", f"auto: {free / 2**30:.1f} GiB free, stage 1's working set {need / 2**30:.1f} GiB"
    return "after", f"auto: {free / 2**30:.1f} GiB free, less than stage 1's working set {need / 2**30:.1f} GiB"


def train_models(r: Run, train: ResidentTriplets, stage1: Trainee, ceiling: Trainee | None, book) -> None:
    """Stage 1 with the ceiling (in lockstep or after it) until the planned steps or the time
    limit, with the time the last probe and the writing need kept back."""
    stage = r.pretrain.stage1
    reserve = _reserve(r, book)
    together = [stage1] + ([ceiling] if ceiling is not None and r.result["ceiling"]["mode"] == "concurrent" else [])
    after = ceiling is not None and ceiling not in together
    budget = r.left() - reserve
    first_end = time.monotonic() + (budget * STAGE1_SHARE_WHEN_AFTER if after else budget)
    probe = _prober(r, book, together, stage.steps)
    seed = r.pretrain.data.shuffle_seed
    out = Lockstep(together, stage.steps, first_end, probe).run(endless(train, stage.batch_size, seed))
    probe(stage1.steps_done, final=True)
    if after:
        probe = _prober(r, book, [ceiling], stage1.steps_done)
        Lockstep([ceiling], stage1.steps_done, time.monotonic() + r.left() - reserve, probe).run(
            endless(train, stage.batch_size, seed))
        probe(ceiling.steps_done, final=True)
    _training_figures(r, stage1, ceiling, out)


def _reserve(r: Run, book) -> float:
    """Seconds kept back for the last probe and the writing: the floor's probe fit, timed, twice
    over (the last row fits two probes), and 15 s."""
    return 15.0 + (2.0 * book.floor.result()["seconds"] if book is not None else 0.0)


def _prober(r: Run, book, trainees: list[Trainee], last: int):
    """The callback after each lockstep step: probes at regular steps and at ``last``, progress."""
    names = {"stage1": "trained", "ceiling": "supervised"}
    every, recorded = r.cfg.probe_every, set()

    def probe(step: int, final: bool = False) -> None:
        if step in recorded or not (final or step % every == 0 or step == last):
            return
        recorded.add(step)
        for t in trainees:
            if book is not None and t.steps_done == step:
                book.record(names[t.name], step, t.model)
        _progress(r, trainees, step, book)

    return probe


def _progress(r: Run, trainees: list[Trainee], step: int, book) -> None:
    means = {t.name: t.step.take_means() for t in trainees}
    losses = ", ".join(f"{n} loss {m.get('loss', float('nan')):.4g}" for n, m in means.items())
    print(f"paper: step {step:,}/{r.pretrain.stage1.steps:,} {losses} | {r.left() / 60:.1f} min left", flush=True)
    r.result["probes"] = book.done_rows() if book is not None else []
    r.save(f"running: step {step}")


def _training_figures(r: Run, stage1: Trainee, ceiling: Trainee | None, out: dict[str, Any]) -> None:
    batch = r.pretrain.stage1.batch_size
    r.result["stage1"].update(
        steps_done=stage1.steps_done, samples_done=stage1.steps_done * batch,
        paper_budget_share=stage1.steps_done * batch / PAPER_SAMPLES, stop_reason=out["stop_reason"],
        train_seconds=out["seconds"], training_samples_per_s=out["steps"] * batch / max(out["seconds"], 1e-9))
    if ceiling is not None:
        r.result["ceiling"]["steps_done"] = ceiling.steps_done


def report(result: dict[str, Any]) -> str:
    """What ``jobs/benchmark.py paper`` prints: the markdown it also wrote."""
    return render_markdown(with_every_figure(result))
