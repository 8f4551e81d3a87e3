"""Config of ``jobs/export.py``: a trained run written as a self-contained folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lapo_ray import UsageError
from lapo_ray.config.models import config_to_dict


@dataclass
class ExportConfig:
    """A pretrain run's models (safetensors), config, probe figures and model card in one folder
    that ``lapo_ray.load_run`` reads without Ray. Nothing in it depends on the machine, so both
    presets are the class defaults."""

    run: str = field(default="", metadata={
        "help": "the pretrain run folder (or one stage-1 checkpoint) to export; path or URI"})
    out: str = field(default="", metadata={
        "help": "the export folder to write (path or URI); it must not exist yet, unless --replace"})
    replace: bool = field(default=False, metadata={
        "help": "replace an earlier export in --out (never a folder that is not an export)"})

    def validate(self) -> None:
        if not self.run.strip():
            raise UsageError("--run is required: a pretrain run folder (path or URI)")
        if not self.out.strip():
            raise UsageError("--out is required: the export folder to write")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


EXPORT_PRESETS = {"cpu": ExportConfig, "paper": ExportConfig}
