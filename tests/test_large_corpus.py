"""A corpus larger than memory, for real: its frames are 3.2 times the object store of a Ray node
capped at 100 MiB, and one full epoch of its triplets streams through the stage loop on Ray Train
while every process of the node is watched (``benchmarks.ProcessMemory``).

The corpus is uniform noise written by lapo_ray's own corpus writer, so its bytes are real (the
frames do not compress). The model is a stand-in of one parameter (``benchmarks.StreamTask``):
memory is the data path's business, and the cpu-preset model would need minutes for an epoch
here (``jobs/benchmark.py stream --model cpu`` runs it).

The cap is not a hard bound on Ray's shared memory: when spilling lags, Ray places new objects
past it in a file mapping (``peak_fallback_bytes``, 121 MiB at most here), so the test bounds the
processes, not the store.
"""

from __future__ import annotations

import pytest

from test_multinode import start_cluster

STORE = 100 * 2**20
# Bounds, per process over the whole epoch: resident memory at most 1.5 GiB (a Ray Train worker
# with PyTorch loaded and its batches in flight measured 1.1 GiB here, a read worker 0.75), and
# no process's private memory higher in the second half of the epoch than in the first by more
# than 64 MiB: a process that kept what it streamed would grow by the half corpus, 160 MiB.
PEAK_RSS_BOUND = 1536 * 2**20
GROWTH_BOUND = 64 * 2**20


@pytest.fixture(scope="module")
def capped_node():
    import ray

    cluster, restore = start_cluster(head_cpus=2, head_store=STORE)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    restore()


@pytest.mark.slow
def test_an_epoch_of_a_corpus_three_times_the_object_store_streams_in_bounded_memory(capped_node, tmp_path):
    from lapo_ray.benchmarks import bench_stream, format_processes, role

    r = bench_stream(str(tmp_path / "corpus"), store_factor=3.2, batch_size=256)
    procs = r.pop("processes")
    print(r)
    print(format_processes(procs))
    assert r["object_store_bytes"] == STORE, "the node's object store is not the capped one"
    assert r["corpus_decoded_bytes"] >= 3 * STORE and r["corpus_disk_bytes"] >= 3 * STORE
    # A full epoch: every triplet but the last partial batch, and not a step into the next epoch.
    assert r["steps"] == r["corpus_triplets"] // 256 and r["epoch_at_end"] == 0
    print("peak store use", r["peak_store_used_bytes"] >> 20, "MiB, past the cap", r["peak_fallback_bytes"] >> 20,
          "MiB; after the run", r["fallback_bytes_after"] >> 20, "MiB")
    assert any(role(p["names"]) == "RayTrainWorker" for p in procs), "no Ray Train worker was seen"
    assert any(role(p["names"]) == "ReadFiles" for p in procs), "no Ray Data read task was seen"
    for p in procs:
        assert p["peak_rss"] <= PEAK_RSS_BOUND, f"{role(p['names'])} (pid {p['pid']}): peak RSS " \
                                                f"{p['peak_rss'] / 2**20:.0f} MiB"
        assert p["anon_second_half"] <= p["anon_first_half"] + GROWTH_BOUND or p["anon_first_half"] == 0, \
            f"{role(p['names'])} (pid {p['pid']}) grew with the data streamed: private memory " \
            f"{p['anon_first_half'] / 2**20:.0f} MiB in the first half, {p['anon_second_half'] / 2**20:.0f} in the second"
