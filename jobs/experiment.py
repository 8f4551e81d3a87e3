"""The whole LAPO experiment on one Procgen game, one command, resumable step by step:
demonstrator (PPO) -> observation-only corpus -> stages 1 and 2 -> PPO from the latent policy
(with and without decoder supervision) and from scratch over several seeds -> offline decoding at
several k against the majority-action agent -> report with 95% intervals.

    python jobs/experiment.py                          # cpu preset on CoinRun, at most 120 minutes on 2 cores
    python jobs/experiment.py --game ninja --seeds 5 --out artifacts/exp-ninja
    python jobs/experiment.py --preset paper --out s3://bucket/lapo-exp   # on a cluster
"""

import sys

from lapo_ray.config.cli import parse_config
from lapo_ray.config.experiment import EXPERIMENT_PRESETS, ExperimentConfig
from lapo_ray.pipelines.experiment import run_experiment
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(ExperimentConfig, EXPERIMENT_PRESETS, argv, description=__doc__)


def main(argv=None) -> int:
    cfg, ns = parse_args(argv)
    return run_job(lambda: (run_experiment(cfg, ns.preset), print(f"report: {cfg.out}/report.md")))


if __name__ == "__main__":
    sys.exit(main())
