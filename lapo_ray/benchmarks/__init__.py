"""Throughput benchmarks that print figures (speed targets live here, not in timed tests), run
by ``jobs/benchmark.py``. One module a benchmark, each with its ``bench_*`` function and the
``report_*`` text the job prints:

* ``data``: triplets/s of the Ray Data pipeline vs a plain numpy reader;
* ``stage1``: stage-1 samples/s, Ray Train with 1 and 2 workers vs a plain PyTorch loop;
* ``env_runners``: RLlib env steps/s with 1 and 2 env runners vs the raw vector env;
* ``stream``: an epoch of a corpus larger than the object store: memory, spilled bytes, triplets/s;
* ``label``: latent labelling rows/s with 1, 2 and 4 actors.

What several use: ``corpora`` (the benchmark corpus and the noise-corpus writer),
``process_memory`` (peak memory of every process of a node, from /proc) and ``ray_internals``
(the one place Ray-private APIs are read, and why). Measured figures and their history:
docs/results/benchmark-notes.md.
"""

from lapo_ray.benchmarks.corpora import ensure_bench_corpus, write_noise_corpus
from lapo_ray.benchmarks.data import bench_data, report_data
from lapo_ray.benchmarks.env_runners import bench_env_runners, report_env_runners
from lapo_ray.benchmarks.label import bench_label, report_label
from lapo_ray.benchmarks.process_memory import ProcessMemory, format_processes, role
from lapo_ray.benchmarks.ray_internals import object_store_stats
from lapo_ray.benchmarks.stage1 import bench_stage1, report_stage1
from lapo_ray.benchmarks.stream import StreamTask, bench_stream, report_stream

__all__ = [
    "ProcessMemory",
    "StreamTask",
    "bench_data",
    "bench_env_runners",
    "bench_label",
    "bench_stage1",
    "bench_stream",
    "ensure_bench_corpus",
    "format_processes",
    "object_store_stats",
    "report_data",
    "report_env_runners",
    "report_label",
    "report_stage1",
    "report_stream",
    "role",
    "write_noise_corpus",
]
