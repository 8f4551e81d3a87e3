"""Collect an observation corpus from Procgen on parallel Ray actors.

    python jobs/collect.py                                   # small default corpus
    python jobs/collect.py --game ninja --frames 1000000 --num-workers 32 --out s3://bucket/ninja
"""

import sys

from lapo_ray.config import CollectConfig
from lapo_ray.config.cli import parse_config
from lapo_ray.data.collect import collect
from lapo_ray.rl.evaluate import POLICY_FACTORIES
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(CollectConfig, {"default": CollectConfig}, argv, description=__doc__,
                        default_preset="default")


def main(argv=None) -> int:
    cfg, _ = parse_args(argv)

    def body():
        m = collect(cfg, policy_factories=POLICY_FACTORIES)
        print(f"corpus {cfg.out}: {m.num_frames:,} frames, {m.num_episodes:,} episodes, "
              f"{m.num_triplets:,} triplets in {len(m.shards)} shards")

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
