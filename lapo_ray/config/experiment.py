"""The end-to-end LAPO experiment on one Procgen game (``jobs/experiment.py``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from lapo_ray import UsageError
from lapo_ray.config import PretrainConfig, config_to_dict, cpu_pretrain, paper_pretrain
from lapo_ray.config.cli import flag_name, get_path
from lapo_ray.config.data import CollectConfig, check_game
from lapo_ray.config.rl import DecoderConfig, EvalConfig, FinetuneConfig, cpu_finetune, paper_finetune

VARIANTS = ("rl+sl", "rl", "scratch")

# The fields of the stages that the experiment sets itself, each with the flag of the experiment
# (or the reason) that decides it. A flag that would change one is refused, not dropped.
SET_BY_EXPERIMENT = {
    **dict.fromkeys(("demonstrator.out", "collect.out", "pretrain.out", "pretrain.corpus", "finetune.pretrain",
                     "finetune.out"), "--out"),
    **dict.fromkeys(("demonstrator.env.game", "collect.game", "finetune.env.game"), "--game"),
    **dict.fromkeys(("demonstrator.seed", "collect.seed", "finetune.seed", "eval.seed"), "--seed"),
    **dict.fromkeys(("demonstrator.wandb.group", "pretrain.wandb.group", "finetune.wandb.group"),
                    "--out's folder name, when empty"),
    "collect.policy": "the demonstrator it trains into --out",
    "demonstrator.scratch": "the demonstrator is PPO from scratch",
    "finetune.scratch": "--variants", "finetune.ppo.decoder_sl": "--variants", "decoder.k": "--decode-k",
}
# Of those, the ones set anew for each online run or offline decoding: there is no one value a
# flag could agree with.
SET_PER_RUN = frozenset({"finetune.out", "finetune.scratch", "finetune.ppo.decoder_sl", "decoder.k"})


def _set_by(path: str) -> str:
    """What decides field ``path`` of an experiment; the pretraining's collect section is the
    experiment's own (its corpus is the one collected)."""
    if path.startswith("pretrain.collect."):
        path = path.removeprefix("pretrain.")
        return SET_BY_EXPERIMENT.get(path, flag_name(path))
    return SET_BY_EXPERIMENT.get(path, "its other flags")



def _cpu_demonstrator() -> FinetuneConfig:
    demonstrator = cpu_finetune()
    demonstrator.ppo.env_steps = 150_000
    demonstrator.checkpoint_every = 10
    return demonstrator


def _cpu_collect() -> CollectConfig:
    """The demonstrator alone shows no action: it plays one action most of the time and an IDM
    trained on the true actions on its corpus never beat that rate
    (docs/results/identifiability.md). Held random excursions (half of the steps, 4 steps long on
    average) make the corpus half play data, like the sticky-random corpus where stage 1 learns
    the action at this budget."""
    return CollectConfig(frames=85_000, epsilon=0.25, noise_hold=0.75)


def _cpu_pretrain() -> PretrainConfig:
    pretrain = cpu_pretrain()
    pretrain.stage1.steps, pretrain.stage1.time_budget_min = 100_000, 8.0
    pretrain.stage1.report_every, pretrain.stage1.checkpoint_every = 250, 500
    # Shift augmentation, so that a rerun reproduces the committed report, which was made with
    # it; it is not a measured win (docs/results/recipes.md).
    pretrain.stage1.augment, pretrain.stage1.shift_pad = "shift", 4
    pretrain.stage2.steps = 1000
    pretrain.stage2.report_every, pretrain.stage2.checkpoint_every = 250, 500
    # The probe needs 20k labelled triplets it can hold out from stage 1 and from the ceiling's
    # supervised IDM: the validation split is a quarter of an 85k-frame corpus. Stage 1 runs on
    # a time budget, so the larger corpus costs collection time only.
    pretrain.data.val_fraction = 0.25
    return pretrain


def _cpu_finetune() -> FinetuneConfig:
    finetune = cpu_finetune()
    finetune.ppo.env_steps = 50_000
    return finetune


@dataclass
class ExperimentConfig:
    """Demonstrator -> observation-only corpus -> stages 1-2 -> online and offline decoding -> report.

    ``game``, ``seed`` and ``out`` are set once here and written into every stage. The defaults
    are the `cpu` preset: at most 120 minutes on 2 cores, on CoinRun, where the action moves the
    agent and the camera, and PPO from scratch gets a demonstrator clearly above random within the
    budget (docs/results/demonstrator.md). The budgets follow from PPO's rate with the cpu-preset
    agent, where the Learner's epochs dominate (docs/results/choices.md).
    """

    out: str = field(default="artifacts/experiment", metadata={"help": "output folder (path or URI)"})
    game: str = field(
        default="coinrun", metadata={"help": "Procgen game of every stage (replaces the stages' own game fields)"})
    seed: int = field(default=0, metadata={"help": "first seed; online seed i of a variant uses seed + i"})
    seeds: int = field(default=3, metadata={"help": "PPO seeds of the rl+sl and scratch variants (rl, an "
                                            "ablation, runs the first seed only)"})
    demonstrator: FinetuneConfig = field(default_factory=_cpu_demonstrator)
    collect: CollectConfig = field(default_factory=_cpu_collect)
    pretrain: PretrainConfig = field(default_factory=_cpu_pretrain)
    finetune: FinetuneConfig = field(default_factory=_cpu_finetune)
    variants: str = field(default="rl+sl,rl,scratch", metadata={"help": "online variants: rl+sl, rl, scratch"})
    decode_k: tuple[int, ...] = field(default=(16, 256, 4096),
                                      metadata={"help": "labelled-frame budgets for offline decoding"})
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(episodes=100, num_envs=20))
    report_only: bool = field(
        default=False, metadata={"help": "write report.md from the steps already finished and run nothing; the "
                                 "report names the steps still to run"})

    def variant_list(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]

    def online_runs(self) -> list[tuple[str, int]]:
        """(variant, seed) of every online run, seed by seed, so that an interrupted run has
        whole comparisons to show."""
        runs = []
        for i in range(self.seeds):
            runs += [(v, self.seed + i) for v in self.variant_list() if v != "rl" or i == 0]
        return runs

    def validate(self) -> None:
        check_game(self.game)
        unknown = set(self.variant_list()) - set(VARIANTS)
        if unknown:
            raise UsageError(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
        if self.seeds < 1:
            raise UsageError(f"--seeds must be at least 1, got {self.seeds}")
        if not self.decode_k or min(self.decode_k) <= 0:
            raise UsageError("--decode-k needs positive frame counts")
        resolved = self.resolved()
        for part in (resolved.demonstrator, resolved.collect, resolved.pretrain, resolved.finetune):
            part.validate()

    def check_given(self, given: Iterable[str]) -> None:
        """Refuse a flag (a field path in ``given``) whose field the experiment sets to another
        value, naming what sets it. The flags given are compared, not the fields against a
        preset's: a field the experiment overwrites may well differ from the preset's value, and
        a flag given with the value the preset has is still a flag the user expects to act."""
        resolved = self.resolved()
        for path in sorted(given):
            if path in SET_PER_RUN or get_path(resolved, path) != get_path(self, path):
                source = _set_by(path)
                hint = f"; give {source} instead" if re.fullmatch(r"--[\w.-]+", source) else ""
                raise UsageError(f"{flag_name(path)} is set by the experiment ({source}){hint}")

    def resolved(self) -> "ExperimentConfig":
        """A copy with ``game``, ``seed``, the output folders and the collection written into every
        stage (the per-run fields of SET_PER_RUN aside, which the pipeline sets per run)."""
        c = dataclasses.replace(self)
        join = lambda *p: "/".join([self.out.rstrip("/"), *p])  # noqa: E731  (URIs and paths alike)
        c.demonstrator = dataclasses.replace(
            self.demonstrator, out=join("demonstrator"), scratch=True, seed=self.seed,
            env=dataclasses.replace(self.demonstrator.env, game=self.game))
        c.collect = dataclasses.replace(self.collect, out=join("corpus"), game=self.game, seed=self.seed,
                                        policy=f"agent:{join('demonstrator')}")
        c.pretrain = dataclasses.replace(self.pretrain, out=join("pretrain"), corpus=join("corpus"), collect=c.collect)
        c.finetune = dataclasses.replace(self.finetune, pretrain=join("pretrain"), seed=self.seed,
                                         env=dataclasses.replace(self.finetune.env, game=self.game))
        c.eval = dataclasses.replace(self.eval, seed=self.seed + EvalConfig().seed)
        # One wandb group for the whole experiment: its folder's name, unless one is given.
        group = self.out.rstrip("/").rsplit("/", 1)[-1]
        for part in ("demonstrator", "pretrain", "finetune"):
            sub = getattr(c, part)
            if not sub.wandb.group:
                setattr(c, part, dataclasses.replace(sub, wandb=dataclasses.replace(sub.wandb, group=group)))
        return c

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def cpu_experiment() -> ExperimentConfig:
    """The class defaults: at most 120 minutes on 2 cores, on CoinRun."""
    return ExperimentConfig()


def paper_experiment() -> ExperimentConfig:
    """The paper's scale: demonstrator trained 25M steps, 8M-frame corpus (the paper's expert
    data size per game), paper pretraining and 4M steps of fine-tuning. For a cluster."""
    demonstrator = paper_finetune()
    demonstrator.ppo.env_steps = 25_000_000
    return ExperimentConfig(
        demonstrator=demonstrator,
        collect=CollectConfig(frames=8_000_000, num_workers=32, envs_per_worker=64),
        pretrain=paper_pretrain(), finetune=paper_finetune(), decode_k=(16, 64, 256, 1024, 4096), eval=EvalConfig(),
    )


EXPERIMENT_PRESETS = {"cpu": cpu_experiment, "paper": paper_experiment}

__all__ = ["ExperimentConfig", "EXPERIMENT_PRESETS", "SET_BY_EXPERIMENT", "VARIANTS"]
