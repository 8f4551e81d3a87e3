"""A sweep: pretraining runs (stage 1 and the probe) over a grid of config fields and seeds."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from lapo_ray import UsageError
from lapo_ray.config import PretrainConfig, cpu_pretrain, paper_pretrain
from lapo_ray.config.cli import flag_name


# The pretraining fields each trial sets itself (``pipelines.sweep.trial_config``), with the
# sweep's flag that decides them: neither a --pretrain flag nor a --grid axis may set them.
SET_BY_SWEEP = {"out": "--out", "stage1.seed": "--seeds", "data.shuffle_seed": "--seeds"}


def _cpu_sweep_pretrain() -> PretrainConfig:
    """The recipe table's budget: the cpu preset's stage 1 for 150 steps at batch 64, the probe
    at the end only, no stage 2."""
    pre = cpu_pretrain()
    pre.stages = "stage1"
    pre.stage1 = dataclasses.replace(pre.stage1, steps=150, report_every=50, checkpoint_every=150)
    pre.data = dataclasses.replace(pre.data, val_fraction=0.2)
    pre.probe = dataclasses.replace(pre.probe, during_training=0)
    pre.wandb = dataclasses.replace(pre.wandb, mode="disabled")
    return pre


@dataclass
class SweepConfig:
    """Every trial is one pretraining run of ``pretrain`` with one value of each ``grid`` field
    and one seed, in a folder of its own under ``out``. The defaults are the `cpu` preset."""

    out: str = field(default="artifacts/sweep", metadata={"help": "sweep folder (path or URI): trials, table, plot"})
    grid: tuple[str, ...] = field(
        default=(),
        metadata={"help": "FIELD=V1,V2,... per swept config field, dotted as the pretrain flags; repeat the "
                  "flag per field (e.g. --grid stage1.augment=none,shift --grid model.vq.enabled=true,false)",
                  "repeatable": True},
    )
    seeds: int = field(default=3, metadata={"help": "seeds per configuration (stage 1's seed and the data shuffle)"})
    search: Literal["grid", "random"] = field(
        default="grid", metadata={"help": "grid: every combination; random: --samples random combinations"})
    samples: int = field(default=4, metadata={"help": "with --search random: configurations drawn from the grid"})
    metric: str = field(default="gap_closed",
                        metadata={"help": "probe.json figure the table ranks configurations by"})
    max_concurrent: int = field(
        default=0, metadata={"help": "trials at once; 0: as many as the cluster's CPUs fit (a trial's "
                                     "workers plus one Ray Data read task)"})
    trial_cpus: float = field(
        default=0.0, metadata={"help": "CPUs Tune reserves for each trial's driver, besides the CPUs its Train "
                                       "workers and Ray Data reads ask for (the driver mostly waits on them)"})
    pretrain: PretrainConfig = field(default_factory=_cpu_sweep_pretrain)

    def validate(self) -> None:
        if self.seeds < 1:
            raise UsageError(f"--seeds must be at least 1, got {self.seeds}")
        if self.search == "random" and self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}")
        axes = self.axes()  # parses --grid
        for path in axes:
            if path in SET_BY_SWEEP:
                raise UsageError(f"--grid {path}: each trial's {path} is set by the sweep ({SET_BY_SWEEP[path]})")
        if not self.pretrain.corpus and "corpus" not in axes:
            raise UsageError("a sweep needs --pretrain.corpus (or --grid corpus=...): collect it first with "
                             "jobs/collect.py, so every trial reads the same frames")
        self.pretrain.validate()

    def check_given(self, given: Iterable[str]) -> None:
        """Refuse a --pretrain flag for a field each trial sets itself."""
        for path in sorted(given):
            inner = path.removeprefix("pretrain.")
            if path.startswith("pretrain.") and inner in SET_BY_SWEEP:
                raise UsageError(f"{flag_name(path)} is set by the sweep for each trial ({SET_BY_SWEEP[inner]})")

    def axes(self) -> dict[str, list[str]]:
        """field path -> its values as written, in the order given."""
        axes: dict[str, list[str]] = {}
        for item in self.grid:
            path, sep, values = item.partition("=")
            if not sep or not path or not values:
                raise UsageError(f"--grid {item!r}: expected FIELD=V1,V2,...")
            if path in axes:
                raise UsageError(f"--grid: {path} given twice")
            axes[path] = [v.strip() for v in values.split(",") if v.strip()]
        return axes

    def configurations(self) -> list[dict[str, str]]:
        """The swept configurations: every combination, or ``samples`` of them drawn with a fixed
        seed (the same draw on a resumed sweep)."""
        axes = self.axes()
        combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] or [{}]
        if self.search == "random":
            combos = random.Random(0).sample(combos, min(self.samples, len(combos)))
        return combos


def config_name(values: dict[str, str]) -> str:
    """A readable, file-safe name of one configuration: ``baseline`` for the base config."""
    if not values:
        return "baseline"
    parts = []
    for path, value in values.items():
        short = corpus_name(value) if path == "corpus" else value
        parts.append(f"{path.split('.')[-1]}={short}")
    return ",".join(parts).replace(" ", "")


def corpus_name(corpus: str) -> str:
    """``--corpus`` as a folder name: each source's last folder (``+`` between several) and a hash
    of the whole value, since two corpora may share a last folder (``data/a/coinrun``,
    ``data/b/coinrun``)."""
    entries = [e.strip().rstrip("/") for e in corpus.split(",")]
    digest = hashlib.sha1(",".join(entries).encode()).hexdigest()[:6]
    return re.sub(r"[^\w.=+-]", "_", "+".join(e.split("/")[-1] for e in entries)) + f"-{digest}"


def cpu_sweep() -> SweepConfig:
    """The class defaults: the recipe table's budget."""
    return SweepConfig()


def paper_sweep() -> SweepConfig:
    pre = paper_pretrain()
    pre.stages = "stage1"
    return SweepConfig(pretrain=pre)


SWEEP_PRESETS: dict[str, Any] = {"cpu": cpu_sweep, "paper": paper_sweep}
