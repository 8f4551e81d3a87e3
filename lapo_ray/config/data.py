"""Configs of the data room: corpus collection and the triplet pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lapo_ray import UsageError

# The one list of Procgen games; the envs room and every config that names a game check here.
PROCGEN_GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)


def check_game(game: str, flag: str = "--game") -> None:
    if game not in PROCGEN_GAMES:
        raise UsageError(f"{flag} {game!r} is not a Procgen game; choose one of {', '.join(PROCGEN_GAMES)}")


@dataclass
class CollectConfig:
    """Roll a policy out in Procgen on parallel Ray actors and write a corpus."""

    out: str = field(default="data/corpus", metadata={"help": "corpus directory (path or URI)"})
    game: str = field(default="coinrun", metadata={"help": "Procgen game to collect (one of the 16 in PROCGEN_GAMES)"})
    frames: int = field(default=60_000, metadata={"help": "total frames to collect"})
    num_workers: int = field(default=2, metadata={"help": "parallel collector actors"})
    envs_per_worker: int = field(default=16, metadata={"help": "Procgen envs each collector actor steps together"})
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
    distribution_mode: Literal["easy", "hard"] = field(
        default="easy", metadata={"help": "Procgen difficulty (the paper's data: easy)"})
    num_levels: int = field(
        default=0, metadata={"help": "size of the Procgen level set; 0: unbounded (every episode a fresh level)"})
    start_level: int = field(default=0, metadata={"help": "first level seed of the level set"})
    seed: int = field(
        default=0, metadata={"help": "base seed: each actor's envs and policy draw from (seed, actor, resume point), "
                             "so a resumed run does not replay what it recorded"})
    shard_frames: int = field(
        default=8192, metadata={"help": "frames an actor buffers (in whole episodes) before writing one Parquet shard"})
    max_segment_frames: int = field(
        default=256, metadata={"help": "longest segment row an episode is cut into (segments overlap by 2 frames, "
                               "so every triplet lies within one); at least 3"})
    worker_num_cpus: float = field(default=1.0, metadata={"help": "CPUs Ray reserves for each collector actor"})

    @property
    def noise_share(self) -> float:
        """The long-run share of steps whose action is noise: a step starts an excursion with
        probability ``epsilon``, an excursion goes on with probability ``noise_hold``."""
        return self.epsilon / (self.epsilon + 1 - self.noise_hold) if self.noise_hold > 0 else self.epsilon

    def validate(self) -> None:
        check_game(self.game)
        for name in ("frames", "num_workers", "envs_per_worker", "shard_frames"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise UsageError(f"--epsilon must be in [0, 1], got {self.epsilon}")
        if not 0.0 <= self.noise_hold < 1.0:
            raise UsageError(f"--noise-hold must be in [0, 1), got {self.noise_hold}")
        if self.max_segment_frames < 3:
            raise UsageError(f"--max-segment-frames must be >= 3, got {self.max_segment_frames}")


@dataclass
class PipelineConfig:
    """How triplets are drawn from a source. Seeds make every shuffle repeatable."""

    val_fraction: float = field(
        default=0.05,
        metadata={"help": "share of the corpus's episodes held out for validation (validation loss, the probe, "
                  "decoding's held-out triplets), chosen by a seeded hash of the episode id; in [0, 1)"},
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the episode hash that splits train from validation"})
    global_shuffle: Literal["files", "segments", "none"] = field(
        default="files",
        metadata={"help": "files: read the files in a seeded random order (streaming); segments: also an exact "
                  "random_shuffle of all segments (all-to-all through the object store, not streaming); "
                  "none: source order"},
    )
    shuffle_seed: int = field(
        default=0, metadata={"help": "seed of the file order, the segment shuffle and the local shuffle "
                             "(plus the epoch number)"})
    local_shuffle_buffer: int = field(default=2048, metadata={"help": "triplets held for the local shuffle; 0 disables"})
    segments_per_block: int = field(default=4, metadata={"help": "segments fetched per read from Ray Data"})
    prefetch_blocks: int = field(
        default=4, metadata={"help": "batches each consumer reads ahead from Ray Data: reads of --data.segments-per-block "
                             "segments where triplets are cut (stage 1, probe), training batches in stage 2"})
    expand_num_cpus: float = field(
        default=0.5, metadata={"help": "CPUs per Ray Data transform task; leave room for Train workers"}
    )
    on_bad_files: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "an unreadable corpus file: raise stops before training and names it; "
                                   "skip leaves it out and lists it in the scan report"})
    paced_scheduling: bool = field(
        default=True, metadata={"help": "pause Ray Data's scheduling loop while it spins (lapo_ray.data.pacing)"}
    )
    block_mb: float = field(
        default=0.0,
        metadata={"help": "Ray Data's target block size in MiB (what the object store holds and moves); "
                  "0: Ray's default, 128"},
    )

    device_resident: bool = field(
        default=False,
        metadata={"help": "stage 1 and the ceiling: each training worker reads its shard of the training split "
                  "once and holds it on its device (GPU or CPU) as uint8, cutting and shuffling triplets there by "
                  "index; refused before training when it does not fit (stage 2 streams whatever this says)"},
    )
    resident_margin_gb: float = field(
        default=8.0,
        metadata={"help": "GiB of each device's free memory kept for the model, optimiser and activations when "
                  "--data.device-resident checks that the corpus fits"},
    )

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.resident_margin_gb < 0:
            raise UsageError(f"--data.resident-margin-gb must be at least 0, got {self.resident_margin_gb}")
