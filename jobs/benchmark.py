"""Throughput benchmarks: a name, then that benchmark's flags (`python jobs/benchmark.py <name> --help`).

    python jobs/benchmark.py data      # Ray Data triplet pipeline vs a plain numpy reader
    python jobs/benchmark.py stage1    # Ray Train stage 1 (1 and 2 workers) vs a plain PyTorch loop
    python jobs/benchmark.py step --device cuda   # the stage-1 step alone (no Ray): samples/s, MFU
    python jobs/benchmark.py envrunners  # RLlib env steps/s with 1 and 2 env runners vs the raw env
    python jobs/benchmark.py stream    # a corpus 3x the object store through stage 1: memory, spill, triplets/s
    python jobs/benchmark.py label     # latent labelling rows/s with 1, 2 and 4 actors
    python jobs/benchmark.py label --corpus data/label-videos   # the same on a folder of videos (decoding included)
    python jobs/benchmark.py stream --num-cpus 2 --json stream.json   # every figure also to a JSON file
    python jobs/benchmark.py resident --device cuda   # the corpus held on the device vs streaming, triplets/s
    python jobs/benchmark.py paper     # the paper-scale stage 1 without Ray (docs/reproducing.md)
"""

import sys

from lapo_ray.benchmarks import BENCHMARKS, run_benchmark
from lapo_ray.config.cli import parse_command
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(name, config)`` from the flags; parses only, runs nothing."""
    return parse_command({name: b.config for name, b in BENCHMARKS.items()}, argv, description=__doc__)


def main(argv=None) -> int:
    name, cfg = parse_args(argv)
    return run_job(lambda: run_benchmark(name, cfg))


if __name__ == "__main__":
    sys.exit(main())
