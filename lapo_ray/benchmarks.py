"""Throughput benchmarks that print figures (speed targets live here, not in timed tests)."""

from __future__ import annotations

import time
from typing import Any

from lapo_ray import storage
from lapo_ray.config import CollectConfig, PipelineConfig


def ensure_bench_corpus(path: str, frames: int) -> str:
    from lapo_ray.data.collect import collect

    if not storage.exists(storage.join(path, "manifest.json")):
        print(f"collecting a {frames:,}-frame benchmark corpus into {path}", flush=True)
        collect(CollectConfig(out=path, frames=frames, num_workers=2, envs_per_worker=32, policy="random"))
    return path


def bench_data(corpus: str, frames: int = 200_000, batch_size: int = 128, max_batches: int | None = None,
               pipe: PipelineConfig | None = None) -> dict[str, Any]:
    """Triplets/s delivered to a consumer by the Ray Data pipeline vs a plain numpy reader."""
    from lapo_ray.data.sources import CorpusSource
    from lapo_ray.data.triplets import iter_plain_batches, torch_batches, triplet_dataset

    ensure_bench_corpus(corpus, frames)
    src = CorpusSource(corpus)
    n_total = src.manifest.num_triplets
    pipe = pipe or PipelineConfig(val_fraction=0.0)

    def run(batches) -> dict[str, float]:
        """Whole-pass rate (start-up included) and steady rate (after the first batch)."""
        t0, n, first, t1 = time.perf_counter(), 0, 0, None
        for i, b in enumerate(batches):
            if t1 is None:
                t1, first = time.perf_counter(), len(b["step"])
            n += len(b["step"])
            if max_batches and i + 1 >= max_batches:
                break
        end = time.perf_counter()
        return {"triplets": n, "triplets_per_s": n / (end - t0),
                "steady_triplets_per_s": (n - first) / max(end - t1, 1e-9), "first_batch_s": t1 - t0}

    results: dict[str, Any] = {"corpus_frames": src.manifest.num_frames, "corpus_triplets": n_total,
                               "batch_size": batch_size}
    results["plain"] = run(iter_plain_batches(src, "all", batch_size))
    # Start Ray Data's worker processes once, so the first mode measured does not pay for it.
    warm = PipelineConfig(global_shuffle="none", local_shuffle_buffer=0)
    next(iter(torch_batches(triplet_dataset(src, "all", warm, src.scan_files()[:1]), src.frame_shape, batch_size, warm)))
    for mode in ("files", "none", "segments"):
        cfg = PipelineConfig(**{**pipe.__dict__, "global_shuffle": mode})
        results[f"ray_{mode}"] = run(torch_batches(triplet_dataset(src, "all", cfg), src.frame_shape, batch_size, cfg))
    return results


def _plain_stage1_rates(model_cfg, stage, batches, steps: int, window: int, warmup: int) -> list[float]:
    """Samples/s per window of ``window`` steps of a plain single-process loop: the training step
    ``run_stage`` runs (``StageStep``), batches already in memory, no Ray.
    Windows ending at or before step ``warmup`` are dropped, as for Ray Train's reports."""
    import os

    import torch

    from lapo_ray.train.stages import Stage1Task
    from lapo_ray.train.step import StageStep, make_optimizer, to_channels_last

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    device = torch.device("cpu")
    task = Stage1Task(model_cfg)
    model = to_channels_last(task.build())
    train_step = StageStep(task, model, make_optimizer(model, stage, device), stage, device)
    rates, t0 = [], time.perf_counter()
    for step in range(steps):
        train_step({"frames": batches[step % len(batches)]}, step)
        if (step + 1) % window == 0:
            train_step.take_means()  # what a report reads, as in run_stage
            now = time.perf_counter()
            if step + 1 > warmup:
                rates.append(window * stage.batch_size / (now - t0))
            t0 = now
    return rates


def _summary(rates: list[float]) -> dict[str, float]:
    import numpy as np

    q1, med, q3 = np.percentile(rates, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "windows": len(rates)}


def bench_stage1(corpus: str, preset: str = "cpu", steps: int = 200, batch_size: int = 64,
                 frames: int = 200_000, rounds: int = 2, window: int = 20, warmup: int = 40) -> dict[str, Any]:
    """Stage-1 samples/s: a plain single-process PyTorch loop over in-memory batches (the
    reference: model and optimiser only) vs Ray Train with 1 and 2 workers on the Ray Data
    pipeline.

    Throughput on a small shared machine drifts by +-20% from minute to minute, so one figure
    per mode says little. The modes run ``rounds`` times, interleaved (plain, 1 worker, 2 workers,
    plain, ...), each timed in windows of ``window`` steps; the first ``warmup`` steps of every
    run (start-up, first reads) are dropped, and each mode reports the median window and its
    quartiles."""
    import dataclasses
    import tempfile

    import torch

    from lapo_ray.config import PRETRAIN_PRESETS, WandbConfig
    from lapo_ray.data.sources import CorpusSource
    from lapo_ray.data.triplets import SplitSpec, iter_plain_batches, triplet_dataset
    from lapo_ray.train.step import use_bf16
    from lapo_ray.train.metrics import MetricsSink, read_metrics
    from lapo_ray.train.stages import Stage1Task
    from lapo_ray.train.trainer import fit_stage

    if steps <= warmup or window <= 0 or rounds < 1:
        raise ValueError(f"stage-1 benchmark: steps ({steps}) must exceed warmup ({warmup}); "
                         f"window ({window}) and rounds ({rounds}) must be positive")
    ensure_bench_corpus(corpus, frames)
    src = CorpusSource(corpus)
    cfg = PRETRAIN_PRESETS[preset]()
    stage = dataclasses.replace(cfg.stage1, batch_size=batch_size, steps=steps, report_every=window,
                                checkpoint_every=steps, val_batches=1, time_budget_min=0)
    batches = []
    for b in iter_plain_batches(src, "train", batch_size, SplitSpec(cfg.data.val_fraction, cfg.data.split_seed)):
        batches.append(torch.from_numpy(b["frames"]))
        if len(batches) == 16:
            break

    def ray_rates(workers: int) -> tuple[list[float], list[float]]:
        st = dataclasses.replace(stage, num_workers=workers, cpus_per_worker=1.0 / workers)
        with tempfile.TemporaryDirectory() as out:
            sink = MetricsSink(out, "stage1", WandbConfig(mode="disabled"), {})
            fit_stage(Stage1Task(cfg.model), st, cfg.data, triplet_dataset(src, "train", cfg.data),
                      triplet_dataset(src, "val", dataclasses.replace(cfg.data, global_shuffle="none")),
                      out, {}, sink)
            rows = [r for r in read_metrics(out, "stage1") if r["step"] > warmup]
        return [r["samples_per_s"] for r in rows], [r["data_wait_frac"] for r in rows]

    rates: dict[str, list[float]] = {"plain": [], "ray_1w": [], "ray_2w": []}
    wait: dict[str, list[float]] = {"ray_1w": [], "ray_2w": []}
    for r in range(rounds):
        print(f"stage-1 benchmark round {r + 1}/{rounds}: plain loop", flush=True)
        rates["plain"] += _plain_stage1_rates(cfg.model, stage, batches, steps, window, warmup)
        for workers in (1, 2):
            print(f"stage-1 benchmark round {r + 1}/{rounds}: Ray Train, {workers} worker(s)", flush=True)
            got, w = ray_rates(workers)
            rates[f"ray_{workers}w"] += got
            wait[f"ray_{workers}w"] += w
    results: dict[str, Any] = {
        "preset": preset, "batch_size": batch_size, "steps": steps, "rounds": rounds, "window": window,
        "precision": "bf16" if use_bf16(stage, torch.device("cpu")) else "fp32",
        "window_samples_per_s": rates,
    }
    for mode, xs in rates.items():
        results[mode] = _summary(xs)
        if mode in wait:
            results[mode]["data_wait_frac"] = float(sum(wait[mode]) / max(1, len(wait[mode])))
    return results


def bench_env_runners(envs_per_runner: int = 16, rollout_length: int = 64, iterations: int = 4,
                      runner_counts: tuple[int, ...] = (1, 2), raw_steps: int = 200,
                      cpus: int | None = None, rounds: int = 1, num_epochs: int | None = None) -> dict[str, Any]:
    """Environment steps/s: the Procgen vector env alone (random actions, one process: the ceiling)
    beside RLlib PPO sampling with 1 and 2 env runners, each stepping ``envs_per_runner`` envs with
    the cpu-preset agent (from scratch, so no pretrain folder is needed).

    With ``cpus``, N runners get ``cpus // N`` CPUs each (at least 1); otherwise the cpu preset's
    share. Sampling and learner seconds are each iteration's own (``IterationTimes``), not
    RLlib's smoothed timers."""
    import numpy as np

    from lapo_ray.config.rl import cpu_finetune
    from lapo_ray.envs import NUM_ACTIONS, make_procgen_vector_env
    from lapo_ray.rl.algo import IterationTimes, build_algorithm_config, sampled_env_steps

    out: dict[str, Any] = {"envs_per_runner": envs_per_runner, "rollout_length": rollout_length}
    env = make_procgen_vector_env({"game": "coinrun", "num_envs": envs_per_runner, "num_threads": 1})
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(raw_steps):
        env.step(rng.integers(0, NUM_ACTIONS, envs_per_runner))
    out["raw_vector_env_steps_per_s"] = raw_steps * envs_per_runner / (time.perf_counter() - t0)
    env.close()
    runs: dict[int, dict[str, list[float]]] = {n: {"sample_s": [], "learn_s": [], "iter_s": [], "steps": []}
                                              for n in runner_counts}
    cpus_per_runner: dict[int, float] = {}
    # Rounds interleave the runner counts, so a shared machine's drift hits every mode alike.
    for _ in range(rounds):
        for n in runner_counts:
            cfg = cpu_finetune()
            cfg.scratch, cfg.num_env_runners, cfg.envs_per_runner = True, n, envs_per_runner
            # Each runner holds an equal share of the machine's CPUs; its torch threads follow.
            cfg.cpus_per_env_runner = max(1.0, float(cpus // n)) if cpus else cfg.cpus_per_env_runner
            cpus_per_runner[n] = cfg.cpus_per_env_runner
            cfg.ppo.rollout_length = rollout_length
            cfg.ppo.num_minibatches = 4
            cfg.ppo.num_epochs = num_epochs or cfg.ppo.num_epochs
            algo = build_algorithm_config(cfg).build_algo()
            try:
                algo.train()  # warm-up: worker start, first weights sync
                timer = IterationTimes(algo)
                for _ in range(iterations):
                    steps0 = sampled_env_steps(algo)
                    timer.reset()
                    t = time.perf_counter()
                    algo.train()
                    r = runs[n]
                    r["iter_s"].append(time.perf_counter() - t)
                    r["sample_s"].append(timer.get("sample"))
                    r["learn_s"].append(timer.get("learn"))
                    r["steps"].append(sampled_env_steps(algo) - steps0)
            finally:
                algo.stop()
    for n, r in runs.items():
        rates = [st / s for st, s in zip(r["steps"], r["sample_s"])]
        out[f"rllib_{n}_runners"] = {
            "sampling_env_steps_per_s": sum(r["steps"]) / sum(r["sample_s"]),
            "sampling_env_steps_per_s_median": float(np.median(rates)),
            "sampling_env_steps_per_s_per_iteration": rates,
            "iteration_env_steps_per_s": sum(r["steps"]) / sum(r["iter_s"]),
            "env_steps": sum(r["steps"]),
            "cpus_per_env_runner": cpus_per_runner[n],
            "sample_seconds": r["sample_s"],
            "learn_seconds": r["learn_s"],
        }
    return out


# --------------------------------------------------------------------------- memory and scale


def write_noise_corpus(path: str, frames: int, frame_size: int = 64, episode_frames: int = 1024,
                       shard_frames: int = 8192, seed: int = 0) -> str:
    """A corpus of uniform noise frames with lapo_ray's own corpus writer: noise does not
    compress, so its Parquet bytes are as many as its frames' (Procgen frames shrink ~5-10x).
    Episodes, segments and shards are laid out as a collected corpus's (the defaults here)."""
    import numpy as np

    from lapo_ray.data.corpus import Episode, write_corpus

    if storage.exists(storage.join(path, "manifest.json")):
        return path
    rng = np.random.default_rng(seed)

    def episodes():
        left, eid = frames, 0
        while left > 0:
            n = min(episode_frames, left)
            if left - n < 3:  # no stub episode too short for a triplet at the end
                n = left
            yield Episode(eid, rng.integers(0, 256, (n, frame_size, frame_size, 3), dtype=np.uint8),
                          actions=rng.integers(0, 15, n).astype(np.int64))
            left, eid = left - n, eid + 1

    write_corpus(path, episodes(), "coinrun", shard_frames=shard_frames, made_by={"noise": True, "seed": seed})
    return path


def _proc_tree(root: int) -> set[int]:
    """``root`` and every process below it (from /proc: no psutil needed)."""
    import os

    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _proc_status(pid: int) -> dict[str, int] | None:
    """VmHWM (the kernel's record of the process's peak resident memory), VmRSS, RssAnon and
    RssShmem (object-store pages it touched) in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out if "VmHWM" in out else None


def _proc_name(pid: int) -> str:
    """A Ray worker's process title (``ray::RayTrainWorker...``) or the program and its script."""
    import os

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    prog = os.path.basename(argv[0])
    script = next((os.path.basename(a) for a in argv[1:] if a.endswith(".py")), "")
    return f"{prog} {script}".strip()


class ProcessMemory:
    """Peak memory of a process and every process below it: the driver and the Ray instance it
    started (GCS, raylets and their agents, every worker), sampled in a thread.

    A process's peak is the kernel's VmHWM, exact while the process lives; a process that ends
    between two samples keeps the peak of its last sample. RSS counts the object-store pages a
    process has touched (RssShmem: shared, so summing RSS over processes counts them again), and
    RssAnon is its private memory."""

    def __init__(self, root: int | None = None, interval_s: float = 0.5):
        import os

        self.root, self.interval_s = root or os.getpid(), interval_s
        self.procs: dict[int, dict] = {}
        self._stop = None
        self._thread = None

    def sample(self) -> None:
        for pid in _proc_tree(self.root):
            st = _proc_status(pid)
            if st is None:
                continue
            p = self.procs.setdefault(pid, {"pid": pid, "names": set(), "peak_rss": 0, "peak_anon": 0,
                                            "peak_shmem": 0, "samples": []})
            name = _proc_name(pid)
            if name != "ray::IDLE":
                p["names"].add(name)
            p["peak_rss"] = max(p["peak_rss"], st["VmHWM"])
            p["peak_anon"] = max(p["peak_anon"], st.get("RssAnon", 0))
            p["peak_shmem"] = max(p["peak_shmem"], st.get("RssShmem", 0))
            p["samples"].append((time.time(), st["VmRSS"], st.get("RssAnon", 0)))

    def __enter__(self) -> "ProcessMemory":
        import threading

        # Peaks from here on: the kernel's high-water mark of the processes already running
        # (this driver included) restarts at their current size.
        for pid in _proc_tree(self.root):
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=run, name="process-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def table(self) -> list[dict]:
        """One row per process, largest peak first: pid, name(s), peak RSS, private and shared,
        and the samples (time, RSS, private) it was seen with."""
        rows = [{**p, "names": sorted(p["names"]) or ["ray::IDLE"]} for p in self.procs.values()]
        return sorted(rows, key=lambda r: -r["peak_rss"])


def role(names: list[str]) -> str:
    """A short name for a process from the titles it had (a Ray worker takes one per task)."""
    for key in ("RayTrainWorker", "ReadFiles", "SplitCoordinator", "TrainController", "DatasetManager",
                "SpillWorker", "RestoreWorker", "MapWorker", "raylet", "gcs_server", "DashboardAgent",
                "dashboard.py", "RuntimeEnvAgent", "log_monitor"):
        if any(key in n for n in names):
            return key
    hit = next((n for n in names if n.startswith("ray::")), None)
    return hit.split(".")[0].removeprefix("ray::") if hit else names[0]


def format_processes(procs: list[dict], most: int = 12) -> str:
    """Lines of the processes with the largest peaks, in MiB."""
    lines = [f"{'process':<22} {'pid':>7} {'peak RSS':>9} {'private':>8} {'store pages':>11}"]
    for p in procs[:most]:
        lines.append(f"{role(p['names']):<22} {p['pid']:>7} {p['peak_rss'] / 2**20:>9.0f} "
                     f"{p['peak_anon'] / 2**20:>8.0f} {p['peak_shmem'] / 2**20:>11.0f}")
    if len(procs) > most:
        rest = procs[most:]
        lines.append(f"... {len(rest)} more, each at most {max(p['peak_rss'] for p in rest) / 2**20:.0f} MiB")
    return "\n".join(lines)


def object_store_stats() -> dict[str, int]:
    """Cumulative object-store figures of the connected Ray cluster, all nodes: bytes spilled to
    disk and restored, and bytes that did not fit and went to the fallback file mapping (what
    `ray memory --stats-only` prints)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    s = reply.store_stats
    return {"spilled_bytes": int(s.spilled_bytes_total), "spilled_objects": int(s.spilled_objects_total),
            "restored_bytes": int(s.restored_bytes_total), "fallback_bytes": int(s.object_store_bytes_fallback),
            "used_bytes_now": int(s.object_store_bytes_used), "capacity_bytes": int(s.object_store_bytes_avail)}


class StreamTask:
    """A stage task whose model is one parameter: the stage loop, Ray Train's ingest and the
    triplet cutting run as in stage 1, at the speed of the data rather than of the model (the
    cpu-preset model trains ~100-200 triplets/s on this machine, a 300 MB epoch in minutes).
    Its loss reads a strided sample of every batch."""

    name = "stream"

    def __init__(self, frame_shape: tuple[int, int, int]):
        self.frame_shape = tuple(frame_shape)

    def build(self):
        import torch

        return torch.nn.Linear(1, 1)

    def batches(self, ds, batch_size, pipe, drop_last, epoch, device=None):
        from lapo_ray.data.triplets import torch_batches

        return torch_batches(ds, self.frame_shape, batch_size, pipe, drop_last, epoch, device=device)

    def loss(self, model, batch):
        import torch

        # A strided view: the batch was cut and copied whole; the step need not convert it all.
        mean = batch["frames"][:, :, ::8, ::8].to(torch.float32).mean().reshape(1, 1) / 255.0
        loss = (model(mean) - 0.5).pow(2).mean()
        return loss, {"loss": loss, "frame_mean": mean.reshape(())}

    def validate(self, model, batches):
        return {}

    def extra_metrics(self, model):
        return {}


def _consume_epoch(split, frame_shape, batch_size: int, pipe: PipelineConfig, every: int) -> list[tuple[float, int]]:
    """A Ray task reading one epoch of a Ray Data split as a Train worker would (triplets cut from
    segments, shuffled, as torch batches): (time, triplets so far) every ``every`` batches."""
    from lapo_ray.data.triplets import torch_batches

    marks, n = [(time.time(), 0)], 0
    for i, b in enumerate(torch_batches(split, frame_shape, batch_size, pipe, drop_last=True)):
        b["frames"][:, :, ::8, ::8].float().mean()
        n += len(b["step"])
        if (i + 1) % every == 0:
            marks.append((time.time(), n))
    marks.append((time.time(), n))
    return marks


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
    import dataclasses
    import math
    import tempfile
    import threading

    import ray

    from lapo_ray.config import PRETRAIN_PRESETS, StageConfig, WandbConfig
    from lapo_ray.data.sources import CorpusSource
    from lapo_ray.data.triplets import triplet_dataset
    from lapo_ray.train.metrics import MetricsSink, read_metrics
    from lapo_ray.train.stages import Stage1Task
    from lapo_ray.train.trainer import fit_stage

    store = int(ray.cluster_resources().get("object_store_memory", 0))
    frame_bytes = 64 * 64 * 3
    frames = frames or math.ceil(store_factor * store / frame_bytes)
    if not storage.exists(storage.join(corpus, "manifest.json")):
        print(f"writing a {frames:,}-frame noise corpus ({frames * frame_bytes / 2**20:,.0f} MiB) into {corpus}",
              flush=True)
        write_noise_corpus(corpus, frames)
    src = CorpusSource(corpus)
    m = src.manifest
    fs, root = storage.resolve(corpus)
    disk = sum(fs.get_file_info(storage.resolve(f)[1]).size for f in src.scan_files())
    decoded = m.num_frames * frame_bytes
    if decoded < store_factor * store:
        raise ValueError(f"{corpus}: {decoded / 2**20:.0f} MiB of frames is less than {store_factor:g} x the "
                         f"object store ({store / 2**20:.0f} MiB); give another --corpus or remove this one")
    pipe = PRETRAIN_PRESETS["cpu"]().data
    pipe = dataclasses.replace(pipe, val_fraction=0.0, global_shuffle="files",
                               local_shuffle_buffer=local_shuffle_buffer, block_mb=block_mb,
                               prefetch_blocks=pipe.prefetch_blocks if prefetch_blocks is None else prefetch_blocks)
    # drop_last: each worker's epoch is floor(its triplets / its batch) steps; one worker takes
    # the whole epoch less fewer than one batch.
    steps = m.num_triplets // batch_size if workers == 1 else (m.num_triplets // batch_size) - workers
    stage = StageConfig(lr=1e-3, batch_size=batch_size, steps=steps, warmup_steps=1, num_workers=workers,
                        cpus_per_worker=0.5, report_every=max(1, steps // 8), checkpoint_every=steps,
                        val_batches=0, precision="fp32", max_failures=0, torch_threads=1)
    task = StreamTask(src.frame_shape) if model == "none" else Stage1Task(PRETRAIN_PRESETS["cpu"]().model)
    store_before = object_store_stats()
    # The store's gauges, sampled while the epoch runs: bytes in use, and bytes Ray had to place
    # past the cap in its fallback file mapping (spilling could not keep up).
    peaks = {"used_bytes": 0, "fallback_bytes": 0}
    stop = threading.Event()

    def watch_store():
        while not stop.wait(1.0):
            try:
                now = object_store_stats()
            except Exception:  # noqa: BLE001  (a gauge missed is no reason to fail the run)
                continue
            peaks["used_bytes"] = max(peaks["used_bytes"], now["used_bytes_now"])
            peaks["fallback_bytes"] = max(peaks["fallback_bytes"], now["fallback_bytes"])

    watcher = threading.Thread(target=watch_store, name="store-gauges", daemon=True)
    watcher.start()
    if consumer == "task":
        split = triplet_dataset(src, "train", pipe).streaming_split(1, equal=True)[0]
        with ProcessMemory() as mem:
            t0, started = time.perf_counter(), time.time()
            marks = ray.get(ray.remote(num_cpus=0.5)(_consume_epoch).remote(
                split, src.frame_shape, batch_size, pipe, max(1, steps // 8)))
            wall = time.perf_counter() - t0
        rows = [{"time": t, "step": n // batch_size, "epoch": 0, "data_wait_frac": float("nan"),
                 "samples_per_s": (n - n0) / max(t - t0_, 1e-9)}
                for (t0_, n0), (t, n) in zip(marks[:-1], marks[1:]) if n > n0]
    else:
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
    stop.set()
    watcher.join()
    store_after = object_store_stats()
    last = rows[-1]
    procs = mem.table()
    # Halves of the epoch by the reports' times: memory that grows with the triplets streamed
    # (a process holding the corpus) peaks higher in the second half than in the first.
    t0, t2 = rows[0]["time"], rows[-1]["time"]
    t1 = (t0 + t2) / 2
    for p in procs:
        first = [a for t, _, a in p["samples"] if t0 <= t < t1]
        second = [a for t, _, a in p["samples"] if t1 <= t <= t2]
        p["anon_first_half"] = max(first, default=0)
        p["anon_second_half"] = max(second, default=0)
        del p["samples"]
    steady = [r["samples_per_s"] for r in rows[1:]] or [rows[-1]["samples_per_s"]]
    return {
        "object_store_bytes": store, "corpus_frames": m.num_frames, "corpus_triplets": m.num_triplets,
        "corpus_disk_bytes": disk, "corpus_decoded_bytes": decoded,
        "whole_corpus_in_memory_bytes": decoded,
        "corpus_over_store": decoded / store,
        "consumer": consumer, "model": model if consumer == "train" else "none",
        "workers": workers if consumer == "train" else 1, "batch_size": batch_size, "steps": last["step"],
        "prefetch_blocks": pipe.prefetch_blocks, "local_shuffle_buffer": pipe.local_shuffle_buffer,
        "epoch_at_end": last["epoch"], "triplets_streamed": last["step"] * batch_size,
        "wall_seconds": wall, "triplets_per_s_wall": last["step"] * batch_size / wall,
        "first_report_after_s": rows[0]["time"] - started, "report_steps": [r["step"] for r in rows],
        "triplets_per_s_steady_median": sorted(steady)[len(steady) // 2],
        "data_wait_frac": sum(r["data_wait_frac"] for r in rows) / len(rows),
        "spilled_bytes": store_after["spilled_bytes"] - store_before["spilled_bytes"],
        "restored_bytes": store_after["restored_bytes"] - store_before["restored_bytes"],
        "peak_store_used_bytes": peaks["used_bytes"], "peak_fallback_bytes": peaks["fallback_bytes"],
        "fallback_bytes_after": store_after["fallback_bytes"],
        "processes": procs,
        "peak_rss_max": max(p["peak_rss"] for p in procs),
        "peak_rss_sum": sum(p["peak_rss"] for p in procs),
        "peak_anon_sum": sum(p["peak_anon"] for p in procs),
    }


def bench_label(corpus: str, actors: tuple[int, ...] = (1, 2, 4), frames: int = 16_384,
                batch_size: int = 256) -> dict[str, Any]:
    """Latent labelling throughput with 1, 2 and 4 actors sharing the machine's CPUs (fractional
    CPUs each: N actors of ``(cpus - 1) / N``, one CPU left for Ray Data, as the stage's CPU check
    asks). The IDM is the cpu preset's, untrained: its speed does not depend on its weights, nor
    on the frames, so a missing ``corpus`` is written as noise, in files of 1024 frames (one
    labelling task per file)."""
    import tempfile

    import ray
    import torch

    from lapo_ray.config import PRETRAIN_PRESETS, LabelConfig
    from lapo_ray.data.sources import CorpusSource
    from lapo_ray.models import LatentDynamics
    from lapo_ray.train.checkpoint import save_checkpoint
    from lapo_ray.train.labelling import label_corpus

    write_noise_corpus(corpus, frames, shard_frames=1024)
    src = CorpusSource(corpus)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    cfg = PRETRAIN_PRESETS["cpu"]()
    out: dict[str, Any] = {"corpus_frames": src.manifest.num_frames, "corpus_triplets": src.manifest.num_triplets,
                           "files": len(src.scan_files()), "cpus": cpus}
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        ckpt = storage.join(d, "ckpt")
        save_checkpoint(ckpt, LatentDynamics(cfg.model), None, {"step": 0}, cfg.to_dict())
        for n in actors:
            each = max(cpus - 1.0, 0.25) / n
            t0 = time.perf_counter()
            m = label_corpus(src, ckpt, storage.join(d, f"run-{n}"),
                             LabelConfig(num_actors=n, cpus_per_actor=each, batch_size=batch_size))
            wall = time.perf_counter() - t0
            out[f"actors_{n}"] = {"cpus_per_actor": each, "rows": m["rows"], "wall_seconds": wall,
                                  "rows_per_s": m["rows"] / wall}
    return out
