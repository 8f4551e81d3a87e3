"""Stage 3 offline: learn the latent -> action decoder from k labelled frames, then play.

    python jobs/decode.py --decoder.k 256                       # from artifacts/pretrain
    python jobs/decode.py --decoder.k 4096 --out artifacts/decode-k4096
"""

import json
import sys

from lapo_ray.config.cli import parse_config
from lapo_ray.config.rl import DECODE_PRESETS, DecodeConfig
from lapo_ray.rl.decode import decode_offline
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(DecodeConfig, DECODE_PRESETS, argv, description=__doc__)


def main(argv=None) -> int:
    cfg, _ = parse_args(argv)
    return run_job(lambda: print(json.dumps(decode_offline(cfg), indent=2, default=str)))


if __name__ == "__main__":
    sys.exit(main())
