"""Sweep pretraining recipes on Ray Tune: a grid (or random draw) over config fields, several
seeds each; the table gives each configuration's mean and 95% interval of the probe's figures.

    python jobs/sweep.py --pretrain.corpus data/coinrun --grid stage1.augment=none,shift --seeds 3
    python jobs/sweep.py --pretrain.corpus data/coinrun --grid model.vq.enabled=true,false --search random --samples 2
    ray job submit --working-dir . -- python jobs/sweep.py --pretrain.corpus s3://bucket/coinrun --grid stage1.lr=3e-4,1e-3
"""

import sys

from lapo_ray.config.cli import parse_config
from lapo_ray.config.sweep import SWEEP_PRESETS, SweepConfig
from lapo_ray.pipelines.sweep import run_sweep
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(SweepConfig, SWEEP_PRESETS, argv, description=__doc__)


def main(argv=None) -> int:
    cfg, _ = parse_args(argv)
    return run_job(lambda: print(f"table: {run_sweep(cfg)['out']}/sweep.md"))


if __name__ == "__main__":
    sys.exit(main())
