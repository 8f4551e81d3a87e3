"""Configs of ``jobs/benchmark.py``: one per benchmark, its flags after the benchmark's name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lapo_ray import UsageError


def check_positive(cfg: object, *names: str) -> None:
    """Every value of the fields ``names`` (None aside; a tuple: each of its values, at least one)
    is above zero."""
    for name in names:
        value = getattr(cfg, name)
        values = value if isinstance(value, tuple) else (value,)
        if not values or any(v is not None and v <= 0 for v in values):
            shown = " ".join(map(str, values)) if values else "none"
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {shown}")


@dataclass
class BenchConfig:
    """What every benchmark takes."""

    json: str = field(default="", metadata={
        "help": "also write every figure (stream: with each process's memory) to this JSON file (path or URI)"})


@dataclass
class RayBenchConfig(BenchConfig):
    """A benchmark that runs on Ray: the job joins the cluster RAY_ADDRESS names or starts a local
    instance."""

    num_cpus: int | None = field(default=None, metadata={
        "help": "logical CPUs of the local Ray instance (pin the process with taskset to match); none: all"})

    def validate(self) -> None:
        check_positive(self, "num_cpus")

    def object_store_bytes(self) -> int | None:
        """The object store a local Ray instance is capped at; None: Ray's default."""
        return None


@dataclass
class DataBenchConfig(RayBenchConfig):
    """Triplets/s of the Ray Data pipeline, in each global-shuffle mode, vs a plain numpy reader."""

    corpus: str = field(default="data/bench-corpus", metadata={"help": "corpus folder; collected if missing"})
    frames: int = field(default=200_000, metadata={"help": "frames of the corpus collected when it is missing"})
    batch_size: int = field(default=128, metadata={"help": "triplets per batch"})

    def validate(self) -> None:
        super().validate()
        check_positive(self, "frames", "batch_size")


@dataclass
class Stage1BenchConfig(RayBenchConfig):
    """Stage-1 samples/s: Ray Train with 1 and 2 workers vs a plain PyTorch loop, on CPUs."""

    corpus: str = field(default="data/bench-corpus", metadata={"help": "corpus folder; collected if missing"})
    preset: Literal["cpu", "paper"] = field(default="cpu", metadata={"help": "pretrain preset of model and stage 1"})
    steps: int = field(default=200, metadata={"help": "steps of every run (the first 40 are not timed)"})
    batch_size: int = field(default=64, metadata={"help": "triplets per step"})
    rounds: int = field(default=2, metadata={"help": "interleaved repetitions of every mode"})

    def validate(self) -> None:
        super().validate()
        check_positive(self, "steps", "batch_size", "rounds")


@dataclass
class StepBenchConfig(BenchConfig):
    """The stage-1 training step alone, on random triplets already on the device: samples/s, step
    time, peak memory, FLOPs and MFU. No Ray, no corpus: it runs where PyTorch is all there is."""

    preset: Literal["cpu", "paper"] = field(default="cpu", metadata={"help": "pretrain preset of model and stage 1"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    batch_sizes: tuple[int, ...] = field(default=(64, 128, 256), metadata={"help": "batch sizes to time"})
    precisions: tuple[Literal["fp32", "bf16"], ...] = field(default=("fp32", "bf16"),
                                                           metadata={"help": "precisions to time"})
    steps: int = field(default=50, metadata={"help": "timed steps per batch size and precision"})
    warmup: int = field(default=10, metadata={"help": "untimed steps first (compilation included)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    compile_mode: str = field(default="default",
                              metadata={"help": "torch.compile mode: default, reduce-overhead (CUDA graphs), ..."})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads; none: torch's default"})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "the device's peak TFLOP/s for MFU; none: looked up for known GPUs (CPUs print n/a)"})

    def validate(self) -> None:
        check_positive(self, "batch_sizes", "steps", "threads", "peak_tflops")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be at least 0, got {self.warmup}")


@dataclass
class EnvRunnersBenchConfig(RayBenchConfig):
    """Env steps/s: RLlib PPO with 1 and 2 env runners vs the raw Procgen vector env."""

    envs_per_runner: int = field(default=16, metadata={"help": "Procgen envs each env runner steps"})
    rollout_length: int = field(default=64, metadata={"help": "PPO rollout length per env"})
    iterations: int = field(default=4, metadata={"help": "timed PPO iterations per run (after one warm-up)"})
    rounds: int = field(default=1, metadata={"help": "interleaved repetitions of 1 and 2 runners"})
    epochs: int | None = field(default=None,
                               metadata={"help": "PPO epochs per iteration; none: the cpu preset's"})
    cpus: int | None = field(default=None, metadata={
        "help": "split this many CPUs evenly over the runners; none: the cpu preset's 0.5 each"})

    def validate(self) -> None:
        super().validate()
        check_positive(self, "envs_per_runner", "rollout_length", "iterations", "rounds", "epochs", "cpus")


@dataclass
class StreamBenchConfig(RayBenchConfig):
    """One epoch of a corpus larger than the object store through stage 1: peak memory of every
    process, spilled bytes, triplets/s."""

    corpus: str = field(default="data/stream-corpus", metadata={
        "help": "corpus folder; written as noise (incompressible frames) at --store-factor x the store if missing"})
    object_store_mb: int = field(default=100, metadata={"help": "object store of the local Ray instance, MiB"})
    store_factor: float = field(default=3.0, metadata={"help": "corpus size over the object store's"})
    batch_size: int = field(default=256, metadata={"help": "triplets per step"})
    model: Literal["none", "cpu"] = field(default="none", metadata={
        "help": "none: a one-parameter stand-in (the data path at full speed); cpu: the cpu-preset stage-1 model "
                "(~100-200 triplets/s on 2 cores, an epoch takes minutes)"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers"})
    block_mb: float = field(default=0.0, metadata={"help": "Ray Data target block size, MiB; 0: Ray's default"})
    local_shuffle_buffer: int = field(default=2048, metadata={"help": "triplets in each worker's shuffle buffer"})
    consumer: Literal["train", "task"] = field(default="train", metadata={
        "help": "train: the stage loop on Ray Train; task: one Ray task reading the same split, without Ray "
                "Train's start-up"})
    prefetch_blocks: int | None = field(default=None, metadata={
        "help": "blocks of segments each worker fetches ahead; none: the cpu preset's"})

    def validate(self) -> None:
        super().validate()
        check_positive(self, "object_store_mb", "store_factor", "batch_size", "workers", "prefetch_blocks")
        if self.block_mb < 0 or self.local_shuffle_buffer < 0:
            raise UsageError(f"--block-mb and --local-shuffle-buffer must be at least 0, got {self.block_mb} "
                             f"and {self.local_shuffle_buffer}")

    def object_store_bytes(self) -> int | None:
        return self.object_store_mb * 2**20


@dataclass
class LabelBenchConfig(RayBenchConfig):
    """Latent labelling rows/s with 1, 2 and 4 actors of fractional CPUs, untrained cpu-preset IDM."""

    corpus: str = field(default="data/label-corpus", metadata={
        "help": "a corpus, video folder or LAPO npz folder; a missing one is written as a noise corpus"})
    frames: int = field(default=16_384, metadata={"help": "frames of the noise corpus written when it is missing"})
    actors: tuple[int, ...] = field(default=(1, 2, 4), metadata={"help": "actor counts to time"})

    def validate(self) -> None:
        super().validate()
        check_positive(self, "frames", "actors")
