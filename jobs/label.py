"""Label a corpus with a trained stage-1 checkpoint: the latent action of every triplet centre.

    python jobs/label.py --checkpoint artifacts/pretrain --corpus data/my-videos --out artifacts/my-videos-labels
    python jobs/label.py --checkpoint artifacts/pretrain/stage1/checkpoint_000001 --corpus data/lapo/bigfish/train --data.on-bad-files skip
    python jobs/label.py --preset paper --checkpoint s3://bucket/run --corpus s3://bucket/videos --out s3://bucket/labels --label.num-actors 8
    ray job submit --working-dir . -- python jobs/label.py --checkpoint artifacts/pretrain --corpus data/my-videos

--checkpoint takes a pretrain run folder (its latest stage-1 checkpoint) or one checkpoint; the
model comes from the checkpoint's own config. The shards land in <out>/latents/ (docs/data.md,
"Labelling new video", shows how to read them back).
"""

import sys

from lapo_ray.config.cli import parse_config
from lapo_ray.config.label import LABEL_PRESETS, LabelJobConfig
from lapo_ray.pipelines.label import run_label
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(LabelJobConfig, LABEL_PRESETS, argv, description=__doc__)


def main(argv=None) -> int:
    cfg, _ = parse_args(argv)
    return run_job(lambda: run_label(cfg))


if __name__ == "__main__":
    sys.exit(main())
