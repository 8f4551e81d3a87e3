"""Configs of the training room: stages 1 and 2, labelling, probe, logging."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from lapo_ray import UsageError


@dataclass
class StageConfig:
    """One Ray Train stage (stage 1: IDM + world model; stage 2: latent behaviour cloning).

    The learning rate warms up from 0.1 x lr over ``warmup_steps`` and then decays linearly to
    ``final_lr_frac`` x lr, as in the official LAPO code.
    """

    lr: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate (after warm-up)"})
    batch_size: int = field(default=128, metadata={"help": "global batch, split over workers"})
    steps: int = field(
        default=50_000, metadata={"help": "optimiser steps to train for in all (a resumed run continues to this count)"})
    time_budget_min: float = field(
        default=0.0, metadata={"help": "stop after this many minutes of training (0: no limit)"}
    )
    warmup_steps: int = field(default=50, metadata={"help": "steps of linear warm-up from 0.1 x lr to lr"})
    final_lr_frac: float = field(
        default=0.01, metadata={"help": "after warm-up the lr decays linearly to this fraction of lr at --steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=2.0, metadata={"help": "clip the gradients' global norm to this"})
    num_workers: int = field(
        default=1, metadata={"help": "Ray Train workers (data-parallel ranks); must divide --batch-size"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs Ray reserves for each Train worker"})
    use_gpu: bool = field(
        default=False, metadata={"help": "one GPU per worker (NCCL); false: CPU workers (gloo)"})
    torch_threads: int = field(default=0, metadata={"help": "intra-op threads per worker; 0: cores / local workers"})
    report_every: int = field(
        default=500, metadata={"help": "steps between report rows (training means, validation loss, rates; stage 1 "
                               "also the probe of --probe.during-training); the last step always reports"})
    checkpoint_every: int = field(
        default=5000, metadata={"help": "steps between checkpoints, taken at report steps (so a multiple of "
                                "--report-every); the last step always checkpoints"})
    val_batches: int = field(
        default=4, metadata={"help": "validation batches per worker, read once and scored at every report; "
                             "0: no validation loss"})
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto",
        metadata={"help": "bf16 autocast (VQ distances stay fp32); auto: bf16 on GPUs and on CPUs "
                  "with native bf16 (AVX512-BF16/AMX), fp32 elsewhere, where bf16 is emulated and slow"},
    )
    compile: bool = field(
        default=False, metadata={"help": "torch.compile the model (forward and backward); the first steps compile"})
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = field(
        default="default", metadata={"help": "torch.compile mode; reduce-overhead adds CUDA graphs on GPUs"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = field(
        default="PACK",
        metadata={"help": "where Ray places the workers: PACK fills a node first; STRICT_SPREAD puts every "
                  "worker on a node of its own (the run waits until that many nodes can hold one)"},
    )
    shard_locality: bool = field(
        default=True,
        metadata={"help": "hand each worker the blocks read on its own node first (less traffic between "
                  "nodes); false: blocks go out in the dataset's order, so a seeded run repeats exactly on "
                  "any layout of nodes"},
    )
    seed: int = field(
        default=0, metadata={"help": "torch seed of the initial weights (the same on every rank); stage 1: also of "
                             "the labelled subset for --stage1.action-labels and the probe's untrained IDM"})
    def validate(self, name: str) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.num_workers <= 0:
            raise UsageError(f"{name}: steps, batch_size and num_workers must be positive")
        if self.batch_size % self.num_workers:
            raise UsageError(
                f"{name}: batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}"
            )


@dataclass
class Stage1Config(StageConfig):
    """Stage 1, with the recipe options from the follow-up literature (docs/recipes.md), all off
    by default and in the paper preset (measured on three games: docs/results/recipes.md). They
    live here, not in ``StageConfig``, because stage 2 has nothing they could change."""

    action_labels: int = field(
        default=0,
        metadata={"help": "train a linear latent-to-action head on about this many labelled training "
                  "triplets (a fixed subset chosen by a hash of (episode, step)); 0: no labels. "
                  "LAOM: Nikulin et al. 2025, 'Latent Action Learning Requires Supervision in the Presence "
                  "of Distractors'"},
    )
    action_label_weight: float = field(
        default=1.0, metadata={"help": "weight of the label head's cross-entropy in the loss"})
    action_label_batch: int = field(
        default=32, metadata={"help": "labelled triplets drawn (with replacement) from the labelled set "
                              "at each step, besides the unlabelled batch"})
    change_weight: float = field(
        default=0.0,
        metadata={"help": "per-pixel reconstruction weight 1 + alpha * |o[t+1] - o[t]|, renormalised to "
                  "mean 1 per frame; 0: plain MSE. Emphasises what moved (cf. the change-focused objectives "
                  "discussed with LAOM, Nikulin et al. 2025)"},
    )
    change_baseline: Literal["last", "camera"] = field(
        default="last",
        metadata={"help": "with --stage1.change-weight: what o[t+1] is compared with, 'last' = o[t], "
                  "'camera' = o[t] moved by the camera's estimated shift, so that where the camera follows "
                  "the agent the weight goes to what the camera's motion does not explain (the agent)"},
    )
    augment: Literal["none", "shift"] = field(
        default="none",
        metadata={"help": "'shift' = DrQ random shift (Kostrikov et al. 2021; used for latent actions "
                  "by LAOM, Nikulin et al. 2025), the same offset for the three frames of a triplet"},
    )
    shift_pad: int = field(default=4, metadata={"help": "largest shift in pixels for --stage1.augment shift"})

    def validate(self, name: str) -> None:
        super().validate(name)
        if self.action_labels < 0 or self.change_weight < 0 or self.shift_pad < 0:
            raise UsageError(f"{name}: action_labels, change_weight and shift_pad must not be negative")
        if self.change_baseline != "last" and self.change_weight == 0:
            raise UsageError(f"{name}: change_baseline {self.change_baseline!r} has no effect without change_weight "
                             "(--stage1.change-weight alpha > 0)")
        if self.action_labels > 0 and self.action_label_batch <= 0:
            raise UsageError(f"{name}: action_label_batch must be positive with action_labels, "
                             f"got {self.action_label_batch}")


# The fields only stage 1 has: its recipe options.
STAGE1_ONLY_FIELDS = frozenset(f.name for f in fields(Stage1Config)) - {f.name for f in fields(StageConfig)}


@dataclass
class LabelConfig:
    """Batch inference of latent actions over the whole corpus (Ray Data actor pool)."""

    batch_size: int = field(default=256, metadata={"help": "triplets per inference batch of a labelling actor"})
    num_actors: int = field(
        default=1, metadata={"help": "labelling actors in the Ray Data actor pool (at most one per unlabelled file)"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs Ray reserves for each labelling actor"})
    num_gpus_per_actor: float = field(
        default=0.0, metadata={"help": "GPUs Ray reserves for each labelling actor (fractions share one GPU, "
                               "e.g. 0.25 for four actors); above 0 the IDM runs on CUDA"})

    def validate(self) -> None:
        if self.batch_size <= 0 or self.num_actors <= 0:
            raise UsageError(f"--label.batch-size and --label.num-actors must be positive, got {self.batch_size} "
                             f"and {self.num_actors}")
        if self.cpus_per_actor < 0 or self.num_gpus_per_actor < 0:
            raise UsageError("--label.cpus-per-actor and --label.num-gpus-per-actor must not be negative")
        if self.num_gpus_per_actor > 1 and self.num_gpus_per_actor != int(self.num_gpus_per_actor):
            raise UsageError(f"--label.num-gpus-per-actor {self.num_gpus_per_actor:g}: above 1 it must be a whole "
                             "number of GPUs")


def cpu_labelling() -> LabelConfig:
    """Two half-CPU labelling actors: they leave a whole CPU for Ray Data's reads, where actors
    holding both CPUs of a 2-CPU node starve the read tasks and the job hangs."""
    return LabelConfig(num_actors=2, cpus_per_actor=0.5)


@dataclass
class ProbeConfig:
    """The paper's probe: an MLP from latent action to true action, trained on half of the
    held-out labelled triplets (split by episode) and tested on the other half, with early
    stopping on a validation split carved from the training half (also by episode)."""

    triplets: int = field(
        default=20_000,
        metadata={"help": "labelled validation triplets for the final probe (all the split has if fewer)"},
    )
    during_training: int = field(
        default=4096, metadata={"help": "labelled validation triplets for the probe at each stage-1 report"}
    )
    hidden: tuple[int, ...] = field(default=(128, 128), metadata={"help": "hidden layer widths of the probe MLP"})
    max_epochs: int = field(default=200, metadata={"help": "most epochs the probe trains for"})
    patience: int = field(default=10, metadata={"help": "epochs without a better validation accuracy before stopping"})
    val_fraction: float = field(default=0.2, metadata={"help": "share of the training half that picks the epoch"})
    batch_size: int = field(default=256, metadata={"help": "probe minibatch size"})
    lr: float = field(default=1e-3, metadata={"help": "probe AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "probe AdamW weight decay"})
    ceiling: bool = field(
        default=True,
        metadata={"help": "also probe the ceiling: an IDM of the same encoder trained on the true actions (of a "
                  "corpus that has them) with stage 1's data, batch size and steps; false: skip it"},
    )
    ceiling_from: str = field(
        default="", metadata={"help": "folder whose ceiling/ run to reuse or create (runs that share one "
                                      "corpus, as a sweep's trials); empty: --out"})


@dataclass
class WandbConfig:
    """wandb stays offline unless a project or WANDB_API_KEY is given; it never blocks. One run per
    stage (job_type: the stage), grouped by the job; offline files in <out>/wandb (`wandb sync`)."""

    project: str = field(
        default="", metadata={"help": "wandb project (online logging); empty: 'lapo_ray', offline unless WANDB_API_KEY"})
    mode: Literal["auto", "offline", "online", "disabled"] = field(
        default="auto", metadata={"help": "auto: online with --wandb.project or WANDB_API_KEY, else offline; "
                                  "disabled: no wandb at all"})
    group: str = field(
        default="", metadata={"help": "wandb group of this job's runs (one run per stage); empty: the artifact "
                              "folder's name (an experiment: its folder's name for all its runs)"})
