"""The corpora the benchmarks read, made on first use: a collected Procgen corpus (``data``,
``stage1``) and a corpus of noise frames (``stream``, ``label``)."""

from __future__ import annotations

import numpy as np

from lapo_ray import storage
from lapo_ray.config import CollectConfig
from lapo_ray.data.collect import collect
from lapo_ray.data.corpus import Episode, write_corpus
from lapo_ray.envs import NUM_ACTIONS


def has_corpus(path: str) -> bool:
    return storage.exists(storage.join(path, "manifest.json"))


def ensure_bench_corpus(path: str, frames: int) -> str:
    """A random-policy coinrun corpus of ``frames`` frames at ``path``, collected if none is there."""
    if not has_corpus(path):
        print(f"collecting a {frames:,}-frame benchmark corpus into {path}", flush=True)
        collect(CollectConfig(out=path, frames=frames, num_workers=2, envs_per_worker=32, policy="random"))
    return path


def write_noise_corpus(path: str, frames: int, frame_size: int = 64, episode_frames: int = 1024,
                       shard_frames: int = 8192, seed: int = 0) -> str:
    """A corpus of uniform noise frames with lapo_ray's own corpus writer: noise does not
    compress, so its Parquet bytes are as many as its frames' (collected Procgen frames compress
    several-fold: docs/results/benchmark-notes.md). Episodes, segments and shards are laid out as
    a collected corpus's (the defaults here). Nothing is written if ``path`` holds a corpus."""
    if has_corpus(path):
        return path
    rng = np.random.default_rng(seed)

    def episodes():
        left, eid = frames, 0
        while left > 0:
            n = min(episode_frames, left)
            if left - n < 3:  # no stub episode too short for a triplet at the end
                n = left
            yield Episode(eid, rng.integers(0, 256, (n, frame_size, frame_size, 3), dtype=np.uint8),
                          actions=rng.integers(0, NUM_ACTIONS, n).astype(np.int64))
            left, eid = left - n, eid + 1

    write_corpus(path, episodes(), "coinrun", shard_frames=shard_frames, made_by={"noise": True, "seed": seed})
    return path
