"""Model configuration: typed dataclasses for the IDM, world model, VQ bottleneck and latent policy.

The parts (IDM, world model, VQ, policy) default to the official LAPO values
(schmidtdominik/LAPO, `lapo/config.yaml` and the constructor defaults in `lapo/models.py` /
`lapo/utils.py`), which make the `paper` preset. ``ModelConfig`` itself defaults to the `cpu`
preset: the same parts scaled down so that a stage-1 step at batch 64 runs in a fraction of a
second on a 2-core CPU. This module imports nothing from the rest of the project.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lapo_ray import UsageError


def config_to_dict(config: Any) -> dict[str, Any]:
    """The one way a config becomes JSON-able data (``config_from_dict`` reads it back): nested
    dicts of its fields, tuples as lists once written to JSON."""
    return dataclasses.asdict(config)


@dataclass
class VQConfig:
    """VQ-EMA bottleneck: `num_codebooks` codebooks of `num_embs` codes of size `emb_dim`.

    The continuous latent action is split into `num_codebooks * num_discrete_latents` vectors of
    size `emb_dim`; each vector is quantised independently against its codebook.
    """

    num_codebooks: int = field(default=2, metadata={"help": "codebooks, each with its own codes"})
    num_discrete_latents: int = field(
        default=4, metadata={"help": "vectors quantised per codebook: the latent is num-codebooks x this many codes"})
    emb_dim: int = field(
        default=16, metadata={"help": "size of one code vector; latent dim = num-codebooks x num-discrete-latents x this"})
    num_embs: int = field(default=64, metadata={"help": "codes per codebook"})
    commitment_cost: float = field(
        default=0.05, metadata={"help": "weight of the commitment loss (MSE of the IDM's latent to its codes)"})
    decay: float = field(
        default=0.999, metadata={"help": "EMA decay of the codebook update per step (closer to 1: slower codes)"})
    eps: float = field(
        default=1e-5, metadata={"help": "Laplace smoothing of the EMA cluster sizes (keeps unused codes above 0)"})
    dead_code_threshold: float = field(
        default=0.0,
        metadata={"help": "re-seed a code whose EMA count falls below this fraction of a uniform share "
                  "(total / num-embs) by splitting the most used code, k-means style; 0: never (the official "
                  "behaviour: a code that loses its inputs stays unused for good)"},
    )
    sync_ema: bool = field(
        default=True,
        metadata={"help": "all-reduce the per-batch code counts and sums over data-parallel ranks before the EMA "
                  "update, so every rank holds the codebook one worker would learn on the global batch"},
    )
    enabled: bool = field(
        default=True,
        metadata={"help": "false: pass the IDM's continuous latent to the world model unquantised (as LAOM, "
                  "Nikulin et al. 2025, found better under distractors); codes are then all zero and the "
                  "code-action NMI does not apply"},
    )

    @property
    def latent_dim(self) -> int:
        return self.num_codebooks * self.num_discrete_latents * self.emb_dim


@dataclass
class IDMConfig:
    """IMPALA CNN over o[t-1], o[t], o[t+1] stacked on channels, then a linear head to the latent."""

    impala_scale: int = field(default=4, metadata={"help": "width multiplier of every entry of --impala-channels"})
    impala_channels: tuple[int, ...] = field(
        default=(16, 32, 32), metadata={"help": "channels of each IMPALA conv sequence (each halves the resolution), "
                                        "before x impala-scale"})
    impala_features: int = field(default=256, metadata={"help": "width of the IMPALA CNN's final linear layer"})


@dataclass
class WorldModelConfig:
    """U-Net predicting o[t+1] from (o[t-1], o[t]) and the quantised latent action."""

    base_channels: int = field(
        default=24, metadata={"help": "channels of the U-Net's first level; each level down doubles them"})
    norm: Literal["batch", "group"] = field(
        default="batch",
        metadata={"help": "batch: BatchNorm, as the official code (statistics per worker); group: GroupNorm, "
                  "which trains identically on any number of CPU workers (SyncBatchNorm is GPU-only)"},
    )


@dataclass
class PolicyConfig:
    """IMPALA CNN on o[t] predicting the IDM's continuous latent action."""

    impala_scale: int = field(default=4, metadata={"help": "width multiplier of every entry of --impala-channels"})
    impala_channels: tuple[int, ...] = field(
        default=(16, 32, 32), metadata={"help": "channels of each IMPALA conv sequence (each halves the resolution), "
                                        "before x impala-scale"})
    impala_features: int = field(
        default=256, metadata={"help": "width of the IMPALA CNN's final linear layer (the policy's features)"})


def _cpu_impala() -> dict[str, Any]:
    """The IMPALA CNN of the cpu preset's IDM and policy. Compute, not parameters, sets the
    budget: most of the time goes to the few thin layers at full 64x64 resolution, so the channel
    widths there are small while the linear layer (cheap per sample) keeps its 256 features."""
    return {"impala_scale": 1, "impala_channels": (8, 16, 32), "impala_features": 256}


def cpu_policy_config() -> PolicyConfig:
    return PolicyConfig(**_cpu_impala())


@dataclass
class ModelConfig:
    """The networks; the defaults are the `cpu` preset's small models for 2-core CPU runs at 64x64
    (IDM 0.59 M and world model 0.86 M parameters), ``paper_model_config`` the official ones.

    The world model is at least as large as the IDM, as in the paper (7.8 M vs 3.7 M): a smaller
    one (base 4: a third of the IDM, 4 channels at full resolution) was faster but broke that
    ratio. Step times of both: docs/results/choices.md."""

    idm: IDMConfig = field(default_factory=lambda: IDMConfig(**_cpu_impala()))
    # GroupNorm: a CPU run with several workers then trains exactly the one-worker model.
    wm: WorldModelConfig = field(default_factory=lambda: WorldModelConfig(base_channels=8, norm="group"))
    # 2 x 2 latents of 16 codes still carry 16 bits per transition, far above the log2(15) ~ 3.9
    # bits of a Procgen action. A faster EMA decay shortens the start-up transient of the
    # codebook, which matters for runs of a few thousand steps. Dead codes are re-seeded: in runs
    # of a few thousand steps most codes otherwise die before the IDM learns to use them, and the
    # probe fell with them (docs/results/choices.md).
    vq: VQConfig = field(default_factory=lambda: VQConfig(num_codebooks=2, num_discrete_latents=2, emb_dim=8,
                                                          num_embs=16, decay=0.99, dead_code_threshold=0.1))
    policy: PolicyConfig = field(default_factory=cpu_policy_config)
    frame_size: int = field(
        default=64, metadata={"help": "side in pixels of the square frames the models read (videos are resized to "
                              "it); a power of two >= 4 for the world model's U-Net"})
    channels: int = field(default=3, metadata={"help": "colour channels of one frame"})
    frame_offset: int = field(
        default=1,
        metadata={"help": "d: the IDM reads (o[t-d], o[t], o[t+d]) and the world model predicts o[t+d], so a "
                  "latent spans the d actions from t (a recipe option, cf. LAPA, Ye et al. 2025, which takes "
                  "the frame H steps ahead); the probe and decoders label it with a[t]. 1: the paper"},
    )

    @property
    def latent_dim(self) -> int:
        return self.vq.latent_dim

    def validate(self) -> None:
        if self.frame_offset < 1:
            raise UsageError(f"--model.frame-offset must be at least 1, got {self.frame_offset}")
        if self.frame_size < 4 or self.frame_size & (self.frame_size - 1):
            raise UsageError(f"--model.frame-size must be a power of two >= 4 (the world model's U-Net halves it "
                             f"down to 2x2), got {self.frame_size}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def paper_model_config() -> ModelConfig:
    """Official LAPO defaults: IDM 3.69 M params, world model 7.81 M params, latent dim 128."""
    return ModelConfig(idm=IDMConfig(), wm=WorldModelConfig(), vq=VQConfig(), policy=PolicyConfig())


def cpu_model_config() -> ModelConfig:
    """The class defaults: small models for 2-core CPU runs."""
    return ModelConfig()


MODEL_PRESETS = {"paper": paper_model_config, "cpu": cpu_model_config}


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]()
    except KeyError:
        raise UsageError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}") from None
