"""Mean raw and normalised return (random 0, expert 1) of a fine-tuned or decoded agent over N
episodes, on its training levels and on held-out levels.

    python jobs/evaluate.py --agent artifacts/finetune --eval.episodes 64
    python jobs/evaluate.py --agent artifacts/decode
"""

import json
import sys

from lapo_ray.config.cli import parse_config
from lapo_ray.config.rl import EVALUATE_PRESETS, EvaluateConfig
from lapo_ray.rl.evaluate import evaluate_agent
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(EvaluateConfig, EVALUATE_PRESETS, argv, description=__doc__)


def main(argv=None) -> int:
    cfg, _ = parse_args(argv)
    return run_job(lambda: print(json.dumps(evaluate_agent(cfg), indent=2)))


if __name__ == "__main__":
    sys.exit(main())
