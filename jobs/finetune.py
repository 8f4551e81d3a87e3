"""Stage 3 online: PPO on Procgen from the latent policy (or from scratch) with many rollout actors.

    python jobs/finetune.py --num-env-runners 2                 # from artifacts/pretrain, cpu preset
    python jobs/finetune.py --scratch true --out artifacts/finetune-scratch
    python jobs/finetune.py --ppo.decoder-sl false              # the paper's "RL, no SL" ablation
    python jobs/finetune.py --preset paper --num-env-runners 64 --envs-per-runner 1 --pretrain s3://bucket/pretrain
"""

import json
import sys

from lapo_ray.config.cli import parse_config
from lapo_ray.config.rl import FINETUNE_PRESETS, FinetuneConfig
from lapo_ray.rl.algo import finetune
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(FinetuneConfig, FINETUNE_PRESETS, argv, description=__doc__)


def main(argv=None) -> int:
    cfg, _ = parse_args(argv)
    return run_job(lambda: print(json.dumps(finetune(cfg), indent=2, default=str)))


if __name__ == "__main__":
    sys.exit(main())
