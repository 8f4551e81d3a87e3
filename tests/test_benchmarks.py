"""lapo_ray.benchmarks: the Ray-private APIs it reads are still there (checked without starting
Ray), and the parts of its benchmarks that run without Ray give sane figures on tiny inputs.

The benchmarks themselves need a Ray instance (Ray Data, Ray Train, RLlib) and minutes; they are
run by ``jobs/benchmark.py``, and the streaming one by ``tests/test_large_corpus.py``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lapo_ray.benchmarks import ray_internals


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
    from lapo_ray.benchmarks import write_noise_corpus

    return write_noise_corpus(str(tmp_path_factory.mktemp("noise")), 1200, episode_frames=512, shard_frames=512)


def test_the_noise_corpus_is_laid_out_as_asked_and_written_once(noise_corpus):
    import numpy as np

    from lapo_ray.benchmarks import write_noise_corpus
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
