"""Config of ``jobs/export.py``: a trained run written as a self-contained folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lapo_ray import UsageError
from lapo_ray.config.models import config_to_dict


@dataclass
class ExportConfig:
    """A pretrain run's models (safetensors), config, probe figures and model card in one folder
    that ``lapo_ray.load_run`` reads without Ray; or a trained agent as one plain PyTorch file
    (``models.agent``) that plays without RLlib. Nothing in it depends on the machine, so both
    presets are the class defaults."""

    run: str = field(default="", metadata={
        "help": "the pretrain run folder (or one stage-1 checkpoint) to export; path or URI"})
    agent: str = field(default="", metadata={
        "help": "instead of --run: an agent folder (jobs/finetune.py, jobs/decode.py, the experiment's demonstrator) "
                "to export as one plain PyTorch file at --out (a local path), for jobs/benchmark.py paper"})
    out: str = field(default="", metadata={
        "help": "the export folder to write (path or URI), or with --agent the file; it must not exist yet, "
                "unless --replace"})
    replace: bool = field(default=False, metadata={
        "help": "replace an earlier export in --out (never a folder that is not an export)"})

    def validate(self) -> None:
        if bool(self.run.strip()) == bool(self.agent.strip()):
            raise UsageError("give one of --run (a pretrain run folder, path or URI) and --agent (an agent folder)")
        if not self.out.strip():
            raise UsageError("--out is required: the export folder to write" + (" (with --agent, the file)"
                                                                                 if self.agent else ""))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


EXPORT_PRESETS = {"cpu": ExportConfig, "paper": ExportConfig}
