"""Config of ``jobs/label.py``: label any corpus with a trained stage-1 checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lapo_ray import UsageError
from lapo_ray.config.data import PipelineConfig
from lapo_ray.config.models import config_to_dict
from lapo_ray.config.train import LabelConfig, cpu_labelling


@dataclass
class LabelJobConfig:
    """Latent actions of every triplet centre of a corpus (video folder, LAPO npz folder or lapo_ray
    corpus; path or URI), from a trained stage-1 IDM. The model comes from the checkpoint's own
    config, never from flags. The defaults are the `cpu` preset."""

    out: str = field(default="artifacts/labels", metadata={
        "help": "destination folder (path or URI); the shards go to <out>/latents/, as in a pretrain run"})
    corpus: str = field(default="", metadata={
        "help": "what to label: corpus, LAPO npz folder or video folder (path or URI); several as a comma list"})
    checkpoint: str = field(default="", metadata={
        "help": "a pretrain run folder (its latest stage-1 checkpoint is used) or a stage-1 checkpoint folder/URI"})
    data: PipelineConfig = field(default_factory=PipelineConfig)
    label: LabelConfig = field(default_factory=cpu_labelling)

    def validate(self) -> None:
        if not self.checkpoint.strip():
            raise UsageError("--checkpoint is required: a pretrain run folder or a stage-1 checkpoint (path or URI)")
        if not self.corpus.strip():
            raise UsageError("--corpus is required: the corpus, LAPO npz folder or video folder to label")
        if not self.out.strip():
            raise UsageError("--out must name a destination folder")
        self.data.validate()
        self.label.validate()

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def cpu_label() -> LabelJobConfig:
    """The class defaults: two half-CPU actors, so one CPU stays free for Ray Data's reads on a
    2-CPU machine."""
    return LabelJobConfig()


def paper_label() -> LabelJobConfig:
    """A GPU node: four actors sharing one GPU, with bigger inference batches."""
    return LabelJobConfig(label=LabelConfig(batch_size=1024, num_actors=4, cpus_per_actor=1.0,
                                            num_gpus_per_actor=0.25))


LABEL_PRESETS = {"cpu": cpu_label, "paper": paper_label}
