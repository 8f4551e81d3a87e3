"""Assess a trained stage-1 checkpoint on any corpus: report.md, probe.json and plots/ in --out.

    python jobs/probe.py --checkpoint artifacts/pretrain --corpus data/corpus --ceiling-from artifacts/pretrain
    python jobs/probe.py --checkpoint artifacts/pretrain --corpus data/ninja --out artifacts/probe-ninja
    python jobs/probe.py --checkpoint artifacts/export --corpus data/my-videos --out artifacts/probe-videos
    python jobs/probe.py --checkpoint s3://bucket/run --corpus s3://bucket/a,s3://bucket/b --out s3://bucket/probe

--checkpoint takes a pretrain run folder (its latest stage-1 checkpoint), one stage-1 checkpoint or
an export (jobs/export.py). With true actions in the corpus: the probe against its floor and
ceiling (trained into <out>/ceiling, or a run's reused with --ceiling-from), bits, NMI and
the codes against the actions; in every case: codebook use, latent maps and plots/atlas.png.
"""

import sys

from lapo_ray.config.cli import parse_config
from lapo_ray.config.probe import PROBE_PRESETS, ProbeJobConfig
from lapo_ray.pipelines.probe import run_probe
from lapo_ray.runtime import run_job


def parse_args(argv=None):
    """``(config, namespace)`` from the flags; parses only, runs nothing."""
    return parse_config(ProbeJobConfig, PROBE_PRESETS, argv, description=__doc__)


def main(argv=None) -> int:
    cfg, _ = parse_args(argv)
    return run_job(lambda: run_probe(cfg))


if __name__ == "__main__":
    sys.exit(main())
