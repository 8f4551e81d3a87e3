"""lapo_ray.benchmarks: the registry and the job's flags, the Ray-private APIs it reads are still
there (checked without starting Ray), and the parts of its benchmarks that run without Ray give
sane figures on tiny inputs.

The benchmarks themselves need a Ray instance (Ray Data, Ray Train, RLlib) and minutes; they are
run by ``jobs/benchmark.py``, and the streaming one by ``tests/test_large_corpus.py``. The step
benchmark alone runs here, on tiny batches, where Ray and pyarrow cannot be imported."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys

import pytest
from test_jobs import _job
from test_step import run_benchmark_job_without

from lapo_ray import MissingPathError
from lapo_ray.benchmarks import BENCHMARKS, Benchmark, ray_internals, registry, run_benchmark
from lapo_ray.config import (
    DataBenchConfig,
    EnvRunnersBenchConfig,
    LabelBenchConfig,
    PaperBenchConfig,
    ResidentBenchConfig,
    Stage1BenchConfig,
    StepBenchConfig,
    StreamBenchConfig,
)
from lapo_ray.config.cli import format_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A config per benchmark with every field away from its default, so each field's flag is tested.
NON_DEFAULT = {
    "data": DataBenchConfig(json="d.json", num_cpus=1, corpus="c", frames=10, batch_size=8),
    "stage1": Stage1BenchConfig(json="s.json", num_cpus=2, corpus="c", preset="paper", steps=60, batch_size=4,
                                rounds=3),
    "step": StepBenchConfig(json="t.json", preset="paper", device="cuda:1", batch_sizes=(2, 4), precisions=("bf16",),
                            steps=3, warmup=0, compile=True, compile_mode="reduce-overhead", threads=1,
                            peak_tflops=1.5),
    "envrunners": EnvRunnersBenchConfig(json="e.json", num_cpus=3, envs_per_runner=2, rollout_length=8, iterations=1,
                                        rounds=2, epochs=1, cpus=4),
    "stream": StreamBenchConfig(json="m.json", num_cpus=2, corpus="c", object_store_mb=150, store_factor=3.2,
                                batch_size=16, model="cpu", workers=2, block_mb=8.0, local_shuffle_buffer=0,
                                consumer="task", prefetch_blocks=2),
    "label": LabelBenchConfig(json="l.json", num_cpus=2, corpus="c", frames=100, actors=(3,)),
    "resident": ResidentBenchConfig(json="r.json", num_cpus=2, corpus="c", frames=10, batch_size=8, device="cuda",
                                    epochs=3),
    "paper": PaperBenchConfig(json="p.json", out="o", corpus="c", frames=10, game="ninja", demonstrator="d.pt",
                              epsilon=0.1, noise_hold=0.5, collect_workers=3, envs_per_worker=4, preset="cpu",
                              device="cpu", steps=5, batch_size=4, time_limit_min=1.5, compile=True, ceiling="after",
                              probe_every=2, probe_triplets=64, timing_steps=3, warmup_steps=2, official_lapo="lapo"),
}


def _flags(cfg) -> list[str]:
    return [word for f in dataclasses.fields(cfg)
            for word in (f"--{f.name.replace('_', '-')}", *format_value(getattr(cfg, f.name)).split(" "))]


def test_every_benchmark_is_registered_with_its_config_and_a_run_and_report_of_that_config():
    assert set(BENCHMARKS) == set(NON_DEFAULT) == {"data", "stage1", "step", "envrunners", "stream", "label",
                                                   "resident", "paper"}
    for name, bench in BENCHMARKS.items():
        run, report = bench.functions()
        assert inspect.signature(run).parameters["cfg"].annotation == bench.config.__name__, name
        assert len(inspect.signature(report).parameters) == 1, name


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_every_benchmarks_config_parses_from_its_flags(name):
    job = _job("benchmark")
    assert job.parse_args([name]) == (name, BENCHMARKS[name].config())
    cfg = NON_DEFAULT[name]
    default = type(cfg)()
    same = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) == getattr(default, f.name)]
    assert not same, f"{name}: fields left at their default, so their flags go untested: {same}"
    assert job.parse_args([name, *_flags(cfg)]) == (name, cfg)


def test_a_bad_benchmark_flag_value_is_one_line_naming_the_benchmark_and_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        _job("benchmark").parse_args(["label", "--actors", "2", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    # The program's name is the runner's here; the benchmark's name follows it.
    assert err[0].endswith(" label: error: --actors must be positive, got 2 0"), err
    with pytest.raises(SystemExit):
        _job("benchmark").parse_args(["stream", "--stage1.lr", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(" stream: error: unrecognized arguments: --stage1.lr 1"), err


def test_the_job_runs_the_named_benchmark_through_the_registry(monkeypatch, capsys):
    job = _job("benchmark")
    seen = []
    monkeypatch.setattr(job, "run_benchmark", lambda name, cfg: seen.append((name, cfg)))
    assert job.main(["stream", "--num-cpus", "2", "--object-store-mb", "150"]) == 0
    assert seen == [("stream", StreamBenchConfig(num_cpus=2, object_store_mb=150))]

    def bad_input(name, cfg):
        raise MissingPathError(f"{cfg.corpus}: no corpus")

    monkeypatch.setattr(job, "run_benchmark", bad_input)
    assert job.main(["data", "--corpus", "nowhere"]) == 2
    assert capsys.readouterr().err == "error: nowhere: no corpus\n"


def test_run_benchmark_starts_ray_only_for_ray_benchmarks_with_their_cpus_and_store(monkeypatch, tmp_path, capsys):
    started = []
    monkeypatch.setattr(registry, "init_ray", lambda num_cpus, object_store_memory: started.append(
        (num_cpus, object_store_memory)))
    monkeypatch.setattr(Benchmark, "functions", lambda self: (lambda cfg: {"module": self.module, "steps": 3},
                                                              lambda r: f"report of {r['module']}"))
    out = tmp_path / "figures.json"
    assert run_benchmark("stream", StreamBenchConfig(num_cpus=2, object_store_mb=150, json=str(out))) == {
        "module": "stream", "steps": 3}
    assert started == [(2, 150 * 2**20)]
    assert capsys.readouterr().out == "report of stream\n"
    assert json.loads(out.read_text()) == {"module": "stream", "steps": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]  # no temporary file left
    run_benchmark("envrunners", EnvRunnersBenchConfig())
    assert started[-1] == (None, None)  # Ray's default object store
    run_benchmark("step", StepBenchConfig())
    assert len(started) == 2, "the step benchmark started Ray"
    with pytest.raises(TypeError, match="benchmark 'stream' takes a StreamBenchConfig, got a DataBenchConfig"):
        run_benchmark("stream", DataBenchConfig())


def test_the_step_benchmark_runs_from_the_job_without_ray_or_pyarrow(tmp_path):
    out = tmp_path / "step.json"
    argv = ["step", "--batch-sizes", "2", "--precisions", "fp32", "--steps", "2", "--warmup", "1", "--threads", "1",
            "--json", str(out)]
    r = run_benchmark_job_without(argv, ("ray", "pyarrow", "wandb"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert (figures["preset"], figures["device"], figures["steps"], figures["warmup"], figures["threads"]) == (
        "cpu", "cpu", 2, 1, 1)
    [row] = figures["rows"]
    assert (row["precision"], row["batch_size"]) == ("fp32", 2)
    assert row["samples_per_s"] > 0 and row["gflop_per_sample"] > 0 and row["mfu"] is None
    assert "stage-1 step, cpu preset on cpu" in r.stdout and "n/a" in r.stdout.splitlines()[-1]


def test_the_ray_private_apis_the_benchmarks_read_are_still_there():
    import ray

    missing = ray_internals.missing_ray_apis()
    assert not missing, (
        f"Ray {ray.__version__} no longer provides {', '.join(missing)}, which "
        "lapo_ray/benchmarks/ray_internals.py reads (checked on ray 2.60.0) for the object store's spilled, "
        "restored and fallback bytes of `jobs/benchmark.py stream`; find where this Ray keeps them and change "
        "that module (its docstring says what it needs)")


def test_a_ray_api_gone_is_named_in_full(monkeypatch):
    monkeypatch.setattr(ray_internals, "INTERNAL_FUNCTIONS", (*ray_internals.INTERNAL_FUNCTIONS, "no_such_call"))
    monkeypatch.setattr(ray_internals, "STORE_STATS_FIELDS", {**ray_internals.STORE_STATS_FIELDS, "x": "no_such_field"})
    assert ray_internals.missing_ray_apis() == [
        "ray._private.internal_api.no_such_call",
        "ray.core.generated.node_manager_pb2.FormatGlobalMemoryInfoReply.store_stats.no_such_field",
    ]
    monkeypatch.setattr(ray_internals, "INTERNAL_API", "ray._private.no_such_module")
    monkeypatch.setattr(ray_internals, "REPLY_MESSAGE", "NoSuchReply")
    assert ray_internals.missing_ray_apis() == [
        "ray._private.no_such_module", "ray.core.generated.node_manager_pb2.NoSuchReply.store_stats"]


@pytest.fixture(scope="module")
def noise_corpus(tmp_path_factory):
    from lapo_ray.benchmarks.corpora import write_noise_corpus

    return write_noise_corpus(str(tmp_path_factory.mktemp("noise")), 1200, episode_frames=512, shard_frames=512)


def test_the_noise_corpus_is_laid_out_as_asked_and_written_once(noise_corpus):
    import numpy as np

    from lapo_ray.benchmarks.corpora import write_noise_corpus
    from lapo_ray.data.sources import CorpusSource
    from lapo_ray.envs import NUM_ACTIONS

    src = CorpusSource(noise_corpus)
    m = src.manifest
    # Episodes of 512, 512 and the 176 frames left: two triplets fewer than frames in each.
    assert m.num_frames == 1200 and m.num_triplets == 1200 - 2 * 3
    assert len(src.scan_files()) == 3
    actions = np.concatenate([np.concatenate(t["actions"].to_pylist()) for f in src.scan_files()
                              for t in src.file_segments(f)])
    assert actions.min() >= 0 and actions.max() < NUM_ACTIONS  # segments overlap: frames repeat
    assert write_noise_corpus(noise_corpus, 10) == noise_corpus  # a corpus there is kept
    assert CorpusSource(noise_corpus).manifest.num_frames == 1200


def test_the_plain_reader_pass_is_timed_without_ray(noise_corpus):
    import ray

    from lapo_ray.benchmarks.data import timed_pass
    from lapo_ray.data.sources import CorpusSource
    from lapo_ray.data.triplets import iter_plain_batches

    ray_before = ray.is_initialized()  # False unless a test above started it
    src = CorpusSource(noise_corpus)
    r = timed_pass(iter_plain_batches(src, "all", 64))
    assert set(r) == {"triplets", "triplets_per_s", "steady_triplets_per_s", "first_batch_s"}
    assert r["triplets"] == src.manifest.num_triplets
    assert r["triplets_per_s"] > 0 and r["steady_triplets_per_s"] > 0 and r["first_batch_s"] >= 0
    assert timed_pass(iter_plain_batches(src, "all", 64), max_batches=3)["triplets"] == 3 * 64
    assert ray.is_initialized() == ray_before, "the plain reader started Ray"


def test_the_plain_stage1_loop_reports_a_rate_a_window_after_warmup(noise_corpus, monkeypatch):
    import dataclasses
    import os

    import torch

    from lapo_ray.benchmarks.stage1 import _in_memory_batches, plain_stage1_rates, summarise_rates
    from lapo_ray.config import PRETRAIN_PRESETS
    from lapo_ray.data.sources import CorpusSource

    cfg = PRETRAIN_PRESETS["cpu"]()
    stage = dataclasses.replace(cfg.stage1, batch_size=4, precision="fp32")
    batches = _in_memory_batches(CorpusSource(noise_corpus), cfg, 4, count=2)
    assert len(batches) == 2 and batches[0].shape[0] == 4
    # The loop takes a thread per core, as a benchmark should; on a test machine's busy cores
    # OpenMP threads that wait on each other make it many times slower (measured:
    # docs/results/benchmark-notes.md).
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    threads = torch.get_num_threads()
    try:
        rates = plain_stage1_rates(cfg.model, stage, batches, steps=6, window=2, warmup=2)
    finally:
        torch.set_num_threads(threads)
    assert len(rates) == 2 and all(r > 0 for r in rates)  # the windows ending at steps 4 and 6
    s = summarise_rates(rates)
    assert s["windows"] == 2 and s["q1"] <= s["median"] <= s["q3"]


def test_process_memory_sees_a_child_and_its_peak():
    from lapo_ray.benchmarks import ProcessMemory, format_processes, role

    mib = 2**20
    with ProcessMemory(interval_s=0.05) as mem:
        child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 * 2**20); time.sleep(1.0)"])
        child.wait(timeout=30)
    procs = mem.table()
    seen = {p["pid"]: p for p in procs}
    assert child.pid in seen, "the child process was never sampled"
    assert seen[child.pid]["peak_rss"] >= 64 * mib and seen[child.pid]["peak_anon"] >= 64 * mib
    assert [p["peak_rss"] for p in procs] == sorted((p["peak_rss"] for p in procs), reverse=True)
    lines = format_processes(procs, most=1).splitlines()
    assert lines[0].split() == ["process", "pid", "peak", "RSS", "private", "store", "pages"]
    assert len(lines) == 2 + (len(procs) > 1)
    assert role(["ray::RayTrainWorker.__init__", "ray::IDLE"]) == "RayTrainWorker"
    assert role(["ray::_StatsActor.get"]) == "_StatsActor"
    assert role(["python benchmark.py"]) == "python benchmark.py"


# Last in this module: its Ray instance lives until the module ends.
@pytest.mark.slow
def test_object_store_stats_reads_a_running_instance(ray_local):
    stats = ray_internals.object_store_stats()
    assert list(stats) == list(ray_internals.STORE_STATS_FIELDS)
    assert all(isinstance(v, int) and v >= 0 for v in stats.values()), stats
    assert stats["capacity_bytes"] > 0, stats
