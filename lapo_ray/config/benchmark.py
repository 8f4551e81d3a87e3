"""Configs of ``jobs/benchmark.py``: one per benchmark, its flags after the benchmark's name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lapo_ray import UsageError
from lapo_ray.config.data import check_game


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


@dataclass
class ResidentBenchConfig(RayBenchConfig):
    """Triplets/s of the training split held on the device (--data.device-resident) beside the
    streaming pipeline's, on the same corpus and device."""

    corpus: str = field(default="data/bench-corpus", metadata={"help": "corpus folder; collected if missing"})
    frames: int = field(default=200_000, metadata={"help": "frames of the corpus collected when it is missing"})
    batch_size: int = field(default=128, metadata={"help": "triplets per batch"})
    device: str = field(default="cpu", metadata={"help": "where the batches go and the corpus is held: cpu, cuda, ..."})
    epochs: int = field(default=2, metadata={"help": "epochs read from the held corpus (the first after loading it)"})

    def validate(self) -> None:
        super().validate()
        check_positive(self, "frames", "batch_size", "epochs")


@dataclass
class PaperBenchConfig(BenchConfig):
    """The paper-scale stage 1 on one machine without Ray: collect a corpus, hold it on the device,
    train stage 1 and the supervised ceiling within a time limit, probe at regular steps, time the
    official LAPO step, and write JSON and markdown (docs/reproducing.md)."""

    out: str = field(default="artifacts/paper-stage1", metadata={
        "help": "folder of the corpus (unless --corpus), paper_stage1.json and paper_stage1.md (a local path)"})
    corpus: str = field(default="", metadata={
        "help": "an existing lapo_ray corpus to train on; none: --frames collected into OUT/corpus (kept, and "
                "reused by a rerun)"})
    frames: int = field(default=1_000_000, metadata={"help": "frames to collect when there is no corpus"})
    game: str = field(default="coinrun", metadata={"help": "Procgen game collected (the experiment's)"})
    demonstrator: str = field(default="", metadata={
        "help": "the demonstrator as a plain PyTorch file (jobs/export.py --agent); none: sticky-random play, "
                "said so in the output"})
    epsilon: float = field(default=0.25, metadata={
        "help": "behaviour noise on the demonstrator: the share of steps that start a random excursion "
                "(the experiment's recipe)"})
    noise_hold: float = field(default=0.75, metadata={
        "help": "probability that a random excursion goes on another step (the experiment's recipe)"})
    collect_workers: int | None = field(default=None, metadata={
        "help": "collector processes; none: the machine's cores, at most 16"})
    envs_per_worker: int = field(default=64, metadata={"help": "Procgen envs each collector steps together"})
    preset: Literal["paper", "cpu"] = field(default="paper", metadata={"help": "pretrain preset of model and stage 1"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when there is one), cpu, cuda, cuda:1, ..."})
    steps: int | None = field(default=None, metadata={
        "help": "stage-1 steps planned (the lr schedule's length); none: the preset's (paper: 50,000)"})
    batch_size: int | None = field(default=None, metadata={"help": "triplets per step; none: the preset's (128)"})
    time_limit_min: float = field(default=8.0, metadata={
        "help": "wall-clock minutes for the whole command, collection included: training stops in time to probe "
                "and write"})
    compile: bool | None = field(default=None, metadata={
        "help": "torch.compile both models; none: on CUDA only (on CPU compiling takes minutes)"})
    ceiling: Literal["auto", "concurrent", "after", "off"] = field(default="auto", metadata={
        "help": "the supervised IDM: stepped with stage 1 on the same batches (concurrent), after it for as many "
                "steps, or not; auto: concurrent when the device has room"})
    probe_every: int = field(default=2_500, metadata={"help": "steps between probes (and at the last step)"})
    probe_triplets: int | None = field(default=None, metadata={
        "help": "labelled validation triplets of the probe; none: the preset's --probe.triplets"})
    timing_steps: int = field(default=100, metadata={
        "help": "stage-1 steps timed alone for samples/s and MFU, before training starts from the same weights"})
    warmup_steps: int = field(default=10, metadata={"help": "untimed steps before them (compilation included)"})
    official_lapo: str = field(default="", metadata={
        "help": "a checkout of the official LAPO code (schmidtdominik/LAPO) whose stage-1 step is timed on the same "
                "device; none: recorded as not timed"})

    def validate(self) -> None:
        check_game(self.game)
        check_positive(self, "frames", "envs_per_worker", "collect_workers", "steps", "batch_size", "time_limit_min",
                       "probe_every", "probe_triplets", "timing_steps")
        if self.warmup_steps < 1:
            raise UsageError(f"--warmup-steps must be at least 1, got {self.warmup_steps}")
        if not 0.0 <= self.epsilon <= 1.0 or not 0.0 <= self.noise_hold < 1.0:
            raise UsageError(f"--epsilon must be in [0, 1] and --noise-hold in [0, 1), got {self.epsilon} and "
                             f"{self.noise_hold}")
