"""Config of ``jobs/probe.py``: assess any stage-1 checkpoint on any corpus."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from lapo_ray import UsageError
from lapo_ray.config.models import config_to_dict
from lapo_ray.config.train import ProbeConfig

# The atlas of a pretraining run (which has no flags for it) and the probe job's defaults.
ATLAS_ROWS, ATLAS_CONTEXTS = 8, 3


@dataclass
class ProbeJobConfig:
    """What a trained stage-1 IDM's latent actions say on a corpus's held-out episodes: the probe
    against its floor and ceiling where the corpus has true actions, codebook use, the codes
    against the actions, latent maps and the latent-action atlas in every case. The corpus is
    split and read with the checkpoint's own data settings, so on the run's own corpus the probe
    reads the episodes the run held out. Nothing is sized by the machine: both presets are the
    class defaults."""

    out: str = field(default="artifacts/probe", metadata={
        "help": "destination folder (path or URI) for report.md, probe.json and plots/; new, or an earlier probe's"})
    checkpoint: str = field(default="", metadata={
        "help": "a pretrain run folder (its latest stage-1 checkpoint), a stage-1 checkpoint or an export (path or "
                "URI)"})
    corpus: str = field(default="", metadata={
        "help": "corpus, LAPO npz folder or video folder (path or URI); several as a comma list"})
    ceiling_from: str = field(default="", metadata={
        "help": "a run folder (or its ceiling/ folder) whose finished ceiling to reuse; empty: train one into "
                "<out>/ceiling (corpora with actions, unless --probe.ceiling false)"})
    on_bad_files: Literal["raise", "skip"] = field(default="raise", metadata={
        "help": "a corrupt or unreadable file of the corpus: raise (name it and stop) or skip (leave it out, named)"})
    atlas_rows: int = field(default=ATLAS_ROWS, metadata={
        "help": "latent actions (code tuples, most used first) the atlas shows, one row each"})
    atlas_contexts: int = field(default=ATLAS_CONTEXTS, metadata={
        "help": "held-out contexts (o[t-1], o[t]) every atlas row is applied to"})
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(during_training=0))

    def check_given(self, given: Iterable[str]) -> None:
        """Refuse the probe flags that mean something else in a pretraining run."""
        if "probe.during_training" in given:
            raise UsageError("--probe.during-training is the probe stage 1 runs as it trains; the probe job trains "
                             "no stage 1 (--probe.triplets sets its held-out triplets)")
        if "probe.ceiling_from" in given:
            raise UsageError("--probe.ceiling-from is pretraining's (reuse or create); the probe job reuses a "
                             "finished ceiling with --ceiling-from")

    def validate(self) -> None:
        if not self.checkpoint.strip():
            raise UsageError("--checkpoint is required: a pretrain run folder, a stage-1 checkpoint or an export")
        if not self.corpus.strip():
            raise UsageError("--corpus is required: the corpus, LAPO npz folder or video folder to probe on")
        if not self.out.strip():
            raise UsageError("--out must name a destination folder")
        if self.atlas_rows < 1 or self.atlas_contexts < 1:
            raise UsageError("--atlas-rows and --atlas-contexts must be at least 1")
        if self.probe.triplets < 32:
            raise UsageError(f"--probe.triplets {self.probe.triplets}: the probe needs at least 32 held-out triplets")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


PROBE_PRESETS = {"cpu": ProbeJobConfig, "paper": ProbeJobConfig}
