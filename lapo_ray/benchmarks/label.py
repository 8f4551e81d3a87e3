"""Latent labelling rows/s with 1, 2 and 4 actors sharing the machine's CPUs
(``jobs/benchmark.py label``)."""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import ray
import torch

from lapo_ray import storage
from lapo_ray.benchmarks.corpora import has_corpus, write_noise_corpus
from lapo_ray.config import PRETRAIN_PRESETS, LabelBenchConfig, LabelConfig
from lapo_ray.data.sources import open_source
from lapo_ray.models import LatentDynamics
from lapo_ray.train.checkpoint import save_checkpoint
from lapo_ray.train.labelling import label_corpus


def bench_label(corpus: str, actors: tuple[int, ...] = (1, 2, 4), frames: int = 16_384,
                batch_size: int = 256) -> dict[str, Any]:
    """Latent labelling throughput with 1, 2 and 4 actors sharing the machine's CPUs (fractional
    CPUs each: N actors of ``(cpus - 1) / N``, one CPU left for Ray Data, as the stage's CPU check
    asks). The IDM is the cpu preset's, untrained: its speed does not depend on its weights, nor
    on the frames. ``corpus`` may be any source lapo_ray reads (a video folder: its decoding is
    then part of the figure); a missing one is written as a noise corpus, in files of 1024 frames
    (one labelling task per file)."""
    if not storage.exists(corpus) or has_corpus(corpus):
        write_noise_corpus(corpus, frames, shard_frames=1024)
    cfg = PRETRAIN_PRESETS["cpu"]()
    src = open_source(corpus, frame_size=(cfg.model.frame_size, cfg.model.frame_size))
    t0 = time.perf_counter()
    scan = src.scan()
    cpus = float(ray.cluster_resources().get("CPU", 1))
    out: dict[str, Any] = {"source": src.name, "kind": getattr(src, "kind", type(src).__name__),
                           "corpus_frames": scan.frames, "corpus_triplets": scan.triplets, "files": len(scan.files),
                           "scan_seconds": time.perf_counter() - t0, "cpus": cpus}
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        ckpt = storage.join(d, "ckpt")
        save_checkpoint(ckpt, LatentDynamics(cfg.model), None, {"step": 0, "stage": "stage1"}, cfg.to_dict())
        for n in actors:
            each = max(cpus - 1.0, 0.25) / n
            t0 = time.perf_counter()
            m = label_corpus(src, ckpt, storage.join(d, f"run-{n}"),
                             LabelConfig(num_actors=n, cpus_per_actor=each, batch_size=batch_size),
                             files=scan.files, file_triplets=scan.file_triplets)
            wall = time.perf_counter() - t0
            out[f"actors_{n}"] = {"cpus_per_actor": each, "rows": m["rows"], "wall_seconds": wall,
                                  "rows_per_s": m["rows"] / wall}
    return out


def run(cfg: LabelBenchConfig) -> dict[str, Any]:
    return bench_label(cfg.corpus, cfg.actors, cfg.frames)


def report(r: dict[str, Any]) -> str:
    """What ``jobs/benchmark.py label`` prints: the figures as JSON, then a line an actor count."""
    lines = [json.dumps(r, indent=2), "",
             f"labelling {r['corpus_triplets']:,} steps in {r['files']} files"
             + (f" ({r['kind']})" if "kind" in r else "") + f" on {r['cpus']:g} CPUs"]
    for key, x in r.items():
        if key.startswith("actors_"):
            lines.append(f"{key.removeprefix('actors_')} actor(s) x {x['cpus_per_actor']:.2g} CPU: "
                         f"{x['rows_per_s']:,.0f} steps/s ({x['wall_seconds']:.1f} s with the actors' start)")
    return "\n".join(lines)
