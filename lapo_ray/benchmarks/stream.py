"""One epoch of a corpus larger than the object store through the stage loop on Ray Train (or
one Ray task reading the same split), while every process of the node is watched
(``jobs/benchmark.py stream``, ``tests/test_large_corpus.py``)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
import threading
import time
from typing import Any

import ray
import torch

from lapo_ray import UsageError, storage
from lapo_ray.benchmarks.corpora import has_corpus, write_noise_corpus
from lapo_ray.benchmarks.process_memory import ProcessMemory, format_processes
from lapo_ray.benchmarks.ray_internals import object_store_stats
from lapo_ray.config import PRETRAIN_PRESETS, PipelineConfig, StageConfig, StreamBenchConfig, WandbConfig
from lapo_ray.data.sources import CorpusSource
from lapo_ray.data.triplets import torch_batches, triplet_dataset
from lapo_ray.train.metrics import MetricsSink, read_metrics
from lapo_ray.train.stages import Stage1Task
from lapo_ray.train.trainer import fit_stage

FRAME_BYTES = 64 * 64 * 3


class StreamTask:
    """A stage task whose model is one parameter: the stage loop, Ray Train's ingest and the
    triplet cutting run as in stage 1, at the speed of the data rather than of the model (the
    cpu-preset model would take minutes for such an epoch: docs/results/benchmark-notes.md).
    Its loss reads a strided sample of every batch."""

    name = "stream"

    def __init__(self, frame_shape: tuple[int, int, int]):
        self.frame_shape = tuple(frame_shape)

    def build(self):
        return torch.nn.Linear(1, 1)

    def batches(self, ds, batch_size, pipe, drop_last, epoch, device=None):
        return torch_batches(ds, self.frame_shape, batch_size, pipe, drop_last, epoch, device=device)

    def loss(self, model, batch):
        # A strided view: the batch was cut and copied whole; the step need not convert it all.
        mean = batch["frames"][:, :, ::8, ::8].to(torch.float32).mean().reshape(1, 1) / 255.0
        loss = (model(mean) - 0.5).pow(2).mean()
        return loss, {"loss": loss, "frame_mean": mean.reshape(())}

    def validate(self, model, batches):
        return {}

    def extra_metrics(self, model):
        return {}


class StoreGauges:
    """The object store's gauges, sampled each ``interval_s`` in a thread while the epoch runs:
    the most bytes in use, and the most Ray had to place past the cap in its fallback file
    mapping (spilling could not keep up). Both are gauges of the moment, not totals, so their peaks
    need sampling."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.peaks = {"used_bytes": 0, "fallback_bytes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="store-gauges", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                now = object_store_stats()
            except Exception:  # noqa: BLE001  (a gauge missed is no reason to fail the run)
                continue
            self.peaks["used_bytes"] = max(self.peaks["used_bytes"], now["used_bytes_now"])
            self.peaks["fallback_bytes"] = max(self.peaks["fallback_bytes"], now["fallback_bytes"])

    def __enter__(self) -> "StoreGauges":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _consume_epoch(split, frame_shape, batch_size: int, pipe: PipelineConfig, every: int) -> list[tuple[float, int]]:
    """A Ray task reading one epoch of a Ray Data split as a Train worker would (triplets cut from
    segments, shuffled, as torch batches): (time, triplets so far) every ``every`` batches."""
    marks, n = [(time.time(), 0)], 0
    for i, b in enumerate(torch_batches(split, frame_shape, batch_size, pipe, drop_last=True)):
        b["frames"][:, :, ::8, ::8].float().mean()
        n += len(b["step"])
        if (i + 1) % every == 0:
            marks.append((time.time(), n))
    marks.append((time.time(), n))
    return marks


def _stream_corpus(corpus: str, store: int, store_factor: float, frames: int | None):
    """The corpus at ``corpus``, written as noise at ``store_factor`` x the store if missing:
    its source, its bytes on disk and its frames' bytes decoded."""
    frames = frames or math.ceil(store_factor * store / FRAME_BYTES)
    if not has_corpus(corpus):
        print(f"writing a {frames:,}-frame noise corpus ({frames * FRAME_BYTES / 2**20:,.0f} MiB) into {corpus}",
              flush=True)
        write_noise_corpus(corpus, frames)
    src = CorpusSource(corpus)
    fs, _ = storage.resolve(corpus)
    disk = sum(fs.get_file_info(storage.resolve(f)[1]).size for f in src.scan_files())
    decoded = src.manifest.num_frames * FRAME_BYTES
    if decoded < store_factor * store:
        raise UsageError(f"{corpus}: {decoded / 2**20:.0f} MiB of frames is less than {store_factor:g} x the "
                         f"object store ({store / 2**20:.0f} MiB); give another --corpus or remove this one")
    return src, disk, decoded


def _stream_plan(num_triplets: int, batch_size: int, workers: int, block_mb: float,
                 local_shuffle_buffer: int, prefetch_blocks: int | None):
    """The cpu preset's pipeline, files shuffled, no validation split; and a stage of exactly one
    epoch."""
    pipe = PRETRAIN_PRESETS["cpu"]().data
    pipe = dataclasses.replace(pipe, val_fraction=0.0, global_shuffle="files",
                               local_shuffle_buffer=local_shuffle_buffer, block_mb=block_mb,
                               prefetch_blocks=pipe.prefetch_blocks if prefetch_blocks is None else prefetch_blocks)
    # drop_last: each worker's epoch is floor(its triplets / its batch) steps; one worker takes
    # the whole epoch less fewer than one batch.
    steps = num_triplets // batch_size if workers == 1 else (num_triplets // batch_size) - workers
    stage = StageConfig(lr=1e-3, batch_size=batch_size, steps=steps, warmup_steps=1, num_workers=workers,
                        cpus_per_worker=0.5, report_every=max(1, steps // 8), checkpoint_every=steps,
                        val_batches=0, precision="fp32", max_failures=0, torch_threads=1)
    return pipe, stage


def _epoch_through_task(src, pipe, batch_size: int, steps: int):
    """One Ray task reads the epoch from a ``streaming_split``: report rows made from its marks,
    wall seconds, start time and the processes' memory."""
    split = triplet_dataset(src, "train", pipe).streaming_split(1, equal=True)[0]
    with ProcessMemory() as mem:
        t0, started = time.perf_counter(), time.time()
        marks = ray.get(ray.remote(num_cpus=0.5)(_consume_epoch).remote(
            split, src.frame_shape, batch_size, pipe, max(1, steps // 8)))
        wall = time.perf_counter() - t0
    rows = [{"time": t, "step": n // batch_size, "epoch": 0, "data_wait_frac": float("nan"),
             "samples_per_s": (n - n0) / max(t - t0_, 1e-9)}
            for (t0_, n0), (t, n) in zip(marks[:-1], marks[1:]) if n > n0]
    return rows, wall, started, mem


def _epoch_through_train(task, src, pipe, stage):
    """The stage loop on Ray Train runs the epoch: its metrics rows, wall seconds, start time
    and the processes' memory."""
    with tempfile.TemporaryDirectory() as out, ProcessMemory() as mem:
        sink = MetricsSink(out, task.name, WandbConfig(mode="disabled"), {})
        t0, started = time.perf_counter(), time.time()
        result = fit_stage(task, stage, pipe, triplet_dataset(src, "train", pipe),
                           triplet_dataset(src, "val", dataclasses.replace(pipe, global_shuffle="none")),
                           out, {}, sink)
        wall = time.perf_counter() - t0
        rows = read_metrics(out, task.name)
    if result.error:
        raise RuntimeError(f"streaming benchmark: the run failed: {result.error}")
    return rows, wall, started, mem


def _private_memory_by_third(procs: list[dict], rows: list[dict]) -> None:
    """Each process's median private memory just after the epoch's first third and at its end
    (windows of a ninth of the epoch, by the reports' times), in place of its samples. A process
    that holds what it streamed grows by two thirds of the corpus between the two; one that
    streams rises and falls with its buffers around one level. The first third is the warm-up,
    left out: a Train worker's private memory rose from about 310 to 790 MiB while its prefetch
    and shuffle buffers filled. Medians, not peaks, and two points two thirds of the epoch apart:
    the buffers' level moved by up to 150 MiB between reports, and medians of consecutive thirds
    differed by up to 89 MiB with nothing kept (docs/testing.md)."""
    t0, t3 = rows[0]["time"], rows[-1]["time"]
    t1, width = t0 + (t3 - t0) / 3, (t3 - t0) / 9
    for p in procs:
        start = [a for t, _, a in p["samples"] if t1 <= t < t1 + width]
        end = [a for t, _, a in p["samples"] if t3 - width <= t <= t3]
        p["anon_after_warmup"] = int(statistics.median(start)) if start else 0
        p["anon_at_end"] = int(statistics.median(end)) if end else 0
        del p["samples"]


def _epoch_figures(rows: list[dict], batch_size: int, wall: float, started: float) -> dict[str, Any]:
    last = rows[-1]
    steady = [r["samples_per_s"] for r in rows[1:]] or [rows[-1]["samples_per_s"]]
    return {
        "epoch_at_end": last["epoch"], "triplets_streamed": last["step"] * batch_size,
        "wall_seconds": wall, "triplets_per_s_wall": last["step"] * batch_size / wall,
        "first_report_after_s": rows[0]["time"] - started, "report_steps": [r["step"] for r in rows],
        "triplets_per_s_steady_median": sorted(steady)[len(steady) // 2],
        "data_wait_frac": sum(r["data_wait_frac"] for r in rows) / len(rows),
    }


def _store_figures(before: dict[str, int], after: dict[str, int], peaks: dict[str, int]) -> dict[str, int]:
    return {
        "spilled_bytes": after["spilled_bytes"] - before["spilled_bytes"],
        "restored_bytes": after["restored_bytes"] - before["restored_bytes"],
        "peak_store_used_bytes": peaks["used_bytes"], "peak_fallback_bytes": peaks["fallback_bytes"],
        "fallback_bytes_after": after["fallback_bytes"],
    }


def _process_figures(procs: list[dict]) -> dict[str, Any]:
    return {
        "processes": procs,
        "peak_rss_max": max(p["peak_rss"] for p in procs),
        "peak_rss_sum": sum(p["peak_rss"] for p in procs),
        "peak_anon_sum": sum(p["peak_anon"] for p in procs),
    }


def bench_stream(corpus: str, store_factor: float = 3.0, batch_size: int = 256, model: str = "none",
                 workers: int = 1, frames: int | None = None, block_mb: float = 0.0,
                 local_shuffle_buffer: int = 2048, prefetch_blocks: int | None = None,
                 consumer: str = "train") -> dict[str, Any]:
    """One full epoch of triplets of a corpus at least ``store_factor`` times the object store
    through the stage loop on Ray Train, under ``ProcessMemory``. The Ray instance must already
    run (capped with ``init_ray(object_store_memory=...)``); a noise corpus of that size is
    written to ``corpus`` if none is there. ``model``: "none" (``StreamTask``) or "cpu" (the
    cpu-preset stage-1 model). ``consumer="task"``: instead of Ray Train, one Ray task reads the
    epoch from a ``streaming_split`` as a Train worker does (Ray Data's same split coordinator),
    without Ray Train's minute of start-up; ``model`` and ``workers`` are then unused."""
    store = int(ray.cluster_resources().get("object_store_memory", 0))
    src, disk, decoded = _stream_corpus(corpus, store, store_factor, frames)
    m = src.manifest
    pipe, stage = _stream_plan(m.num_triplets, batch_size, workers, block_mb, local_shuffle_buffer, prefetch_blocks)
    task = StreamTask(src.frame_shape) if model == "none" else Stage1Task(PRETRAIN_PRESETS["cpu"]().model)
    store_before = object_store_stats()
    with StoreGauges() as gauges:
        if consumer == "task":
            rows, wall, started, mem = _epoch_through_task(src, pipe, batch_size, stage.steps)
        else:
            rows, wall, started, mem = _epoch_through_train(task, src, pipe, stage)
    store_after = object_store_stats()
    procs = mem.table()
    _private_memory_by_third(procs, rows)
    return {
        "object_store_bytes": store, "corpus_frames": m.num_frames, "corpus_triplets": m.num_triplets,
        "corpus_disk_bytes": disk, "corpus_decoded_bytes": decoded,
        "whole_corpus_in_memory_bytes": decoded,
        "corpus_over_store": decoded / store,
        "consumer": consumer, "model": model if consumer == "train" else "none",
        "workers": workers if consumer == "train" else 1, "batch_size": batch_size, "steps": rows[-1]["step"],
        "prefetch_blocks": pipe.prefetch_blocks, "local_shuffle_buffer": pipe.local_shuffle_buffer,
        **_epoch_figures(rows, batch_size, wall, started),
        **_store_figures(store_before, store_after, gauges.peaks),
        **_process_figures(procs),
    }


def run(cfg: StreamBenchConfig) -> dict[str, Any]:
    return bench_stream(cfg.corpus, cfg.store_factor, cfg.batch_size, cfg.model, cfg.workers, block_mb=cfg.block_mb,
                        local_shuffle_buffer=cfg.local_shuffle_buffer, prefetch_blocks=cfg.prefetch_blocks,
                        consumer=cfg.consumer)


def report(r: dict[str, Any]) -> str:
    """What ``jobs/benchmark.py stream`` prints: the figures as JSON (less the process table),
    a paragraph of what they mean, then every process's peak memory."""
    procs = r["processes"]
    mib = 2**20
    return "\n".join([
        json.dumps({k: v for k, v in r.items() if k != "processes"}, indent=2), "",
        f"corpus {r['corpus_frames']:,} frames: {r['corpus_decoded_bytes'] / mib:,.0f} MiB of frames "
        f"({r['corpus_disk_bytes'] / mib:,.0f} MiB on disk) = {r['corpus_over_store']:.1f} x the object store "
        f"({r['object_store_bytes'] / mib:,.0f} MiB)",
        f"one epoch through {'stage 1' if r['consumer'] == 'train' else 'a Ray task'} ({r['model']} model, "
        f"{r['workers']} worker(s), batch {r['batch_size']}): "
        f"{r['triplets_streamed']:,} triplets, {r['triplets_per_s_steady_median']:,.0f} triplets/s (median "
        f"report window), {r['triplets_per_s_wall']:,.0f}/s over the whole run with Ray Train's start; "
        f"data wait {100 * r['data_wait_frac']:.0f}%",
        f"object store: {r['spilled_bytes'] / mib:,.0f} MiB spilled to disk, "
        f"{r['restored_bytes'] / mib:,.0f} MiB restored; at most {r['peak_store_used_bytes'] / mib:,.0f} MiB in use "
        f"and {r['peak_fallback_bytes'] / mib:,.0f} MiB past the cap (sampled each second)",
        f"peak RSS: largest process {r['peak_rss_max'] / mib:,.0f} MiB; all {len(procs)} processes together "
        f"{r['peak_rss_sum'] / mib:,.0f} MiB (object-store pages counted once per process that touched them), "
        f"private {r['peak_anon_sum'] / mib:,.0f} MiB",
        f"loaded whole (the official code's way): {r['whole_corpus_in_memory_bytes'] / mib:,.0f} MiB of "
        "frames in one process, before any batch",
        format_processes(procs, most=len(procs)),
    ])
