"""Stages 1 and 2 of LAPO: latent dynamics, latent labelling and latent behaviour cloning.

    python jobs/pretrain.py                       # cpu preset, collects a small corpus first
    python jobs/pretrain.py --preset paper --corpus s3://bucket/corpus --stage1.num-workers 8 --stage1.use-gpu true
    ray job submit --working-dir . -- python jobs/pretrain.py
"""

import sys

from lapo_ray.config import PRETRAIN_PRESETS, PretrainConfig
from lapo_ray.config.cli import parse_config
from lapo_ray.pipelines.pretrain import run_pretrain
from lapo_ray.rl.evaluate import POLICY_FACTORIES
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(PretrainConfig, PRETRAIN_PRESETS, argv, description=__doc__)


def main(argv=None) -> int:
    cfg, _ = parse_args(argv)

    def body():
        summary = run_pretrain(cfg, policy_factories=POLICY_FACTORIES)
        print(f"report: {summary['out']}/report.md (figures in probe.json, plots in plots/)")

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
