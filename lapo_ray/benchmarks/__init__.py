"""Throughput benchmarks that print figures (speed targets live here, not in timed tests), run
by ``jobs/benchmark.py NAME``. ``BENCHMARKS`` names each with its config class (in
``lapo_ray.config.benchmark``) and its module, whose ``run`` measures and ``report`` writes what
the job prints; ``run_benchmark`` runs one (``registry``). One module a benchmark:

* ``data``: triplets/s of the Ray Data pipeline vs a plain numpy reader;
* ``stage1``: stage-1 samples/s, Ray Train with 1 and 2 workers vs a plain PyTorch loop;
* ``step``: the stage-1 training step alone on one device, without Ray: samples/s, MFU;
* ``env_runners`` (``envrunners``): RLlib env steps/s with 1 and 2 env runners vs the raw vector env;
* ``stream``: an epoch of a corpus larger than the object store: memory, spilled bytes, triplets/s;
* ``label``: latent labelling rows/s with 1, 2 and 4 actors;
* ``resident``: triplets/s of the training split held on the device (``--data.device-resident``)
  beside the streaming pipeline's;
* ``paper`` (with ``paper_collect``, ``paper_train``, ``paper_probe``, ``paper_report`` and
  ``official``): the paper-scale stage 1 as one command on one machine without Ray: collection,
  the corpus held on the device, stage 1 and the ceiling trained within a time limit, the probe at
  regular steps, samples/s, MFU, peak memory and the official LAPO step beside it.

What several use: ``corpora`` (the benchmark corpus and the noise-corpus writer),
``process_memory`` (peak memory of every process of a node, from /proc) and ``ray_internals``
(the one place Ray-private APIs are read, and why). Measured figures and their history:
docs/results/benchmark-notes.md.

This package imports neither Ray nor pyarrow until a benchmark that needs them runs: the step
benchmark runs on machines that have PyTorch alone, the paper one on machines that have PyTorch and
pyarrow (and Procgen's wheels to collect).
"""

from lapo_ray.benchmarks.process_memory import ProcessMemory, format_processes, role
from lapo_ray.benchmarks.registry import BENCHMARKS, Benchmark, run_benchmark, write_figures

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "ProcessMemory",
    "format_processes",
    "role",
    "run_benchmark",
    "write_figures",
]
