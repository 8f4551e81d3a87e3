"""The corpus of the paper-scale command (``benchmarks.paper``): collected on this machine's cores
without Ray, with the experiment's recipe (the demonstrator plus behaviour noise), or reused.

The demonstrator comes as a plain PyTorch file (``jobs/export.py --agent``, read by
``models.agent.load_agent_file``), since there is no Ray to load an RLlib checkpoint. Without one
the corpus is sticky-random play, and the output says so.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from typing import Any

import numpy as np
import torch

from lapo_ray import UsageError, storage
from lapo_ray.config import CollectConfig, PaperBenchConfig
from lapo_ray.data.collect import collect_local
from lapo_ray.data.corpus import read_manifest
from lapo_ray.models.agent import load_agent_file

# Without a demonstrator: the collector's default play, random actions held for about 4 steps.
FALLBACK_POLICY = "sticky:0.75"
MAX_COLLECT_WORKERS = 16


class DemonstratorPolicy:
    """The demonstrator of an agent file as a collection policy (``demonstrator:PATH``): samples
    from its action distribution, as the agent plays. On the GPU when there is one: the paper's
    IMPALA policy costs about a GFLOP a frame, too much for a million frames on CPU cores."""

    def __init__(self, path: str, num_envs: int, seed: int = 0):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net, _ = load_agent_file(path, self.device)
        self._gen = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self.net(torch.from_numpy(obs).to(self.device)).float()
            actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=self._gen).squeeze(-1)
        return actions.cpu().numpy().astype(np.int64)

    def reset(self, mask) -> None:
        pass


POLICY_FACTORIES = {"demonstrator": DemonstratorPolicy}


def collect_config(cfg: PaperBenchConfig) -> CollectConfig:
    """The collection the command asks for: the demonstrator with the recipe's noise, or the fallback."""
    workers = cfg.collect_workers or min(os.cpu_count() or 1, MAX_COLLECT_WORKERS)
    base = CollectConfig(out=storage.join(cfg.out, "corpus"), game=cfg.game, frames=cfg.frames, num_workers=workers,
                         envs_per_worker=cfg.envs_per_worker, shard_frames=min(8192, max(256, cfg.frames // workers)))
    if cfg.demonstrator:
        return dataclasses.replace(base, policy=f"demonstrator:{cfg.demonstrator}", epsilon=cfg.epsilon,
                                   noise_hold=cfg.noise_hold)
    return dataclasses.replace(base, policy=FALLBACK_POLICY)


def check_collection(cfg: PaperBenchConfig) -> None:
    """What collecting needs, checked before anything runs."""
    if importlib.util.find_spec("procgen") is None:
        raise UsageError("collecting needs Procgen (procgen-mirror) and gym3, which this Python lacks; carry their "
                         "wheels (docs/reproducing.md) or give --corpus")
    if cfg.demonstrator:
        load_agent_file(cfg.demonstrator)  # a bad file: one line now, not in every collector


def corpus_for(cfg: PaperBenchConfig) -> tuple[str, dict[str, Any]]:
    """(the corpus to train on, what its collection was): --corpus as given, the corpus an earlier
    run collected into OUT/corpus, or a new collection there."""
    if cfg.corpus:
        return cfg.corpus, {"source": "given", "corpus": cfg.corpus}
    collect = collect_config(cfg)
    if storage.exists(storage.join(collect.out, "manifest.json")):
        return collect.out, {"source": "reused", "corpus": collect.out,
                             **_recorded(collect.out), "note": "collected by an earlier run into --out"}
    check_collection(cfg)
    note = "" if cfg.demonstrator else (f"no --demonstrator given: sticky-random play ({FALLBACK_POLICY}) instead of "
                                        "the experiment's demonstrator with behaviour noise")
    if note:
        print(f"collection: {note}", flush=True)
    t0 = time.monotonic()
    manifest = collect_local(collect, policy_factories=POLICY_FACTORIES)
    seconds = time.monotonic() - t0
    return collect.out, {"source": "collected", "corpus": collect.out, "policy": collect.policy,
                         "epsilon": collect.epsilon, "noise_hold": collect.noise_hold, "processes": collect.num_workers,
                         "envs_per_process": collect.envs_per_worker, "frames": manifest.num_frames,
                         "episodes": manifest.num_episodes, "seconds": round(seconds, 1),
                         "frames_per_s": manifest.num_frames / max(seconds, 1e-9),
                         "mean_episode_return": manifest.made_by.get("mean_episode_return"), "note": note}


def _recorded(corpus: str) -> dict[str, Any]:
    """An earlier collection's figures, from its manifest."""
    m = read_manifest(corpus)
    made = m.made_by or {}
    return {"policy": made.get("policy"), "epsilon": made.get("epsilon"), "noise_hold": made.get("noise_hold"),
            "frames": m.num_frames, "episodes": m.num_episodes, "seconds": made.get("seconds"),
            "frames_per_s": m.num_frames / made["seconds"] if made.get("seconds") else None,
            "mean_episode_return": made.get("mean_episode_return")}
