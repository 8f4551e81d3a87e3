"""Export a trained run as a self-contained folder that ``lapo_ray.load_run`` reads without Ray,
or a trained agent as one plain PyTorch file that plays without RLlib.

    python jobs/export.py --run artifacts/pretrain --out artifacts/pretrain-export
    python jobs/export.py --run s3://bucket/run --out s3://bucket/run-export
    python jobs/export.py --agent artifacts/experiment/demonstrator --out demonstrator.pt

The folder holds the weights (safetensors), config.json, the run's probe.json and a model card
README.md with its probe figures and how to load it (docs/training.md, "Using a trained run in
Python"). The agent file is what `jobs/benchmark.py paper --demonstrator FILE` plays on a machine
without Ray (docs/reproducing.md).
"""

import sys

from lapo_ray.config.cli import parse_config
from lapo_ray.config.export import EXPORT_PRESETS, ExportConfig
from lapo_ray.runtime import run_job
from lapo_ray.rl.export import export


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(ExportConfig, EXPORT_PRESETS, argv, description=__doc__)


def main(argv=None) -> int:
    cfg, _ = parse_args(argv)
    return run_job(lambda: export(cfg))


if __name__ == "__main__":
    sys.exit(main())
