"""Configs of the data room: corpus collection and the triplet pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The one list of Procgen games; the envs room and every config that names a game check here.
PROCGEN_GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)


def check_game(game: str, flag: str = "--game") -> None:
    if game not in PROCGEN_GAMES:
        raise ValueError(f"{flag} {game!r} is not a Procgen game; choose one of {', '.join(PROCGEN_GAMES)}")


@dataclass
class CollectConfig:
    """Roll a policy out in Procgen on parallel Ray actors and write a corpus."""

    out: str = field(default="data/corpus", metadata={"help": "corpus directory (path or URI)"})
    game: str = "coinrun"
    frames: int = field(default=60_000, metadata={"help": "total frames to collect"})
    num_workers: int = field(default=2, metadata={"help": "parallel collector actors"})
    envs_per_worker: int = 16
    policy: str = field(
        default="sticky:0.75",
        metadata={"help": "'random', 'sticky:P' (repeat the last action with probability P), "
                  "'agent:PATH' (a trained agent folder) or a module:callable path"},
    )
    epsilon: float = field(
        default=0.0,
        metadata={"help": "probability, per step and env, of replacing the policy's action by a uniform "
                  "random one (behaviour noise: shows a converged expert's unchosen actions)"},
    )
    noise_hold: float = field(
        default=0.0,
        metadata={"help": "probability that a noise action is held one more step: excursions of mean length "
                  "1/(1-P), epsilon/(epsilon+1-P) of the steps noisy; 0: independent per-step noise"},
    )
    distribution_mode: Literal["easy", "hard"] = "easy"
    num_levels: int = 0
    start_level: int = 0
    seed: int = 0
    shard_frames: int = 8192
    max_segment_frames: int = 256
    worker_num_cpus: float = 1.0

    @property
    def noise_share(self) -> float:
        """The long-run share of steps whose action is noise: a step starts an excursion with
        probability ``epsilon``, an excursion goes on with probability ``noise_hold``."""
        return self.epsilon / (self.epsilon + 1 - self.noise_hold) if self.noise_hold > 0 else self.epsilon

    def validate(self) -> None:
        check_game(self.game)
        for name in ("frames", "num_workers", "envs_per_worker", "shard_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"--epsilon must be in [0, 1], got {self.epsilon}")
        if not 0.0 <= self.noise_hold < 1.0:
            raise ValueError(f"--noise-hold must be in [0, 1), got {self.noise_hold}")
        if self.max_segment_frames < 3:
            raise ValueError(f"--max-segment-frames must be >= 3, got {self.max_segment_frames}")


@dataclass
class PipelineConfig:
    """How triplets are drawn from a source. Seeds make every shuffle repeatable."""

    val_fraction: float = 0.05
    split_seed: int = 0
    # "files": files read in a seeded random order (streaming); "segments": an exact
    # random_shuffle of all segments (all-to-all, not streaming); "none": source order.
    global_shuffle: Literal["files", "segments", "none"] = "files"
    shuffle_seed: int = 0
    local_shuffle_buffer: int = field(default=2048, metadata={"help": "triplets held for the local shuffle; 0 disables"})
    segments_per_block: int = field(default=4, metadata={"help": "segments fetched per read from Ray Data"})
    prefetch_blocks: int = 4
    expand_num_cpus: float = field(
        default=0.5, metadata={"help": "CPUs per Ray Data transform task; leave room for Train workers"}
    )
    on_bad_files: Literal["raise", "skip"] = "raise"
    paced_scheduling: bool = field(
        default=True, metadata={"help": "pause Ray Data's scheduling loop while it spins (lapo_ray.data.pacing)"}
    )
    block_mb: float = field(
        default=0.0,
        metadata={"help": "Ray Data's target block size in MiB (what the object store holds and moves); "
                  "0: Ray's default, 128"},
    )

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
