"""Corpus collection: N Ray actors roll a policy out in Procgen and write Parquet shards
(``collect``), or N processes without Ray (``collect_local``, for a machine without it).

Each collector owns its shards (``shards/wIII-KKKKK.parquet``) and writes each one atomically,
so an interrupted collection leaves only complete shards. Running again with the same settings
resumes: every collector counts what it already wrote and collects only the rest. Running again
with different settings is refused with the list of what differs. ``manifest.json`` is written
last, after every collector has finished.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import posixpath
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from lapo_ray import storage, telemetry
from lapo_ray.config import config_to_dict
from lapo_ray.config.data import CollectConfig
from lapo_ray.data.corpus import (
    SHARD_DIR,
    CorpusError,
    Episode,
    Manifest,
    build_manifest,
    episode_to_rows,
    read_manifest,
    shard_uri,
    write_manifest,
    write_shard,
)
from lapo_ray.data.policies import EpsilonPolicy, make_policy
from lapo_ray.envs import OBS_SHAPE, ProcgenVectorEnv
from lapo_ray.progress import Progress
from lapo_ray.runtime import init_ray

log = logging.getLogger(__name__)

COLLECT_CONFIG = "collect_config.json"
# Settings that change what is collected; the rest (out, worker CPUs) may differ on resume.
_IDENTITY_FIELDS = (
    "game", "frames", "num_workers", "envs_per_worker", "policy", "distribution_mode",
    "num_levels", "start_level", "seed", "shard_frames", "max_segment_frames", "epsilon",
    "noise_hold",
)
_EPISODE_BITS = 40  # episode id = worker index << 40 | episode counter of that worker


def worker_prefix(index: int) -> str:
    return f"w{index:03d}"


def existing_worker_state(corpus_uri: str, index: int) -> tuple[int, int, int]:
    """(frames already written, next shard index, next episode counter) of one collector."""
    prefix = worker_prefix(index) + "-"
    root = storage.join(corpus_uri, SHARD_DIR)
    if not storage.exists(root):
        return 0, 0, 0
    fs, _ = storage.resolve(corpus_uri)
    frames, next_shard, next_episode = 0, 0, 0
    for path in storage.list_files(root, suffix=".parquet"):
        name = posixpath.basename(path)
        if not name.startswith(prefix):
            continue
        next_shard = max(next_shard, int(name[len(prefix):-len(".parquet")]) + 1)
        with fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["episode_id", "start", "num_frames"])
        starts = t.column("start").to_numpy()
        frames += int(t.column("num_frames").to_numpy().sum() - 2 * np.count_nonzero(starts > 0))
        ids = t.column("episode_id").to_numpy()
        if len(ids):
            next_episode = max(next_episode, int((ids & ((1 << _EPISODE_BITS) - 1)).max()) + 1)
    return frames, next_shard, next_episode


class Collector:
    """One collection actor: a Procgen vector env, a policy and a shard writer."""

    def __init__(self, cfg: CollectConfig, index: int, budget: int, next_shard: int, next_episode: int,
                 policy_factories=None):
        self.cfg, self.index, self.budget = cfg, index, budget
        # A fresh seed per (worker, resume point): a resumed collector must not replay the levels
        # and action noise it already recorded.
        seed = int(np.random.SeedSequence([cfg.seed, index, next_shard]).generate_state(1)[0] % (2**31))
        self.env = ProcgenVectorEnv(
            game=cfg.game, num_envs=cfg.envs_per_worker, distribution_mode=cfg.distribution_mode,
            num_levels=cfg.num_levels, start_level=cfg.start_level, seed=seed,
        )
        self.policy = make_policy(cfg.policy, cfg.envs_per_worker, seed=seed, factories=policy_factories)
        if cfg.epsilon > 0:
            self.policy = EpsilonPolicy(self.policy, cfg.epsilon, cfg.envs_per_worker, seed=seed,
                                        hold=cfg.noise_hold)
        self.next_shard, self.next_episode = next_shard, next_episode
        self.obs, _ = self.env.reset(seed=seed)
        self.resetting = np.zeros(cfg.envs_per_worker, bool)
        n = cfg.envs_per_worker
        self.ep_frames: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.ep_actions: list[list[int]] = [[] for _ in range(n)]
        self.ep_rewards: list[list[float]] = [[] for _ in range(n)]
        self.ep_ids = [self._new_episode_id() for _ in range(n)]
        self.rows: list[dict[str, Any]] = []
        self.buffered = 0
        self.collected = 0  # frames in finished episodes (written or buffered)
        self.returns: list[float] = []

    def _new_episode_id(self) -> int:
        eid = (self.index << _EPISODE_BITS) | self.next_episode
        self.next_episode += 1
        return eid

    def _close_episode(self, i: int, ended: bool) -> None:
        frames = self.ep_frames[i]
        if len(frames) >= 3:
            dones = np.zeros(len(frames), bool)
            dones[-1] = ended
            ep = Episode(self.ep_ids[i], np.stack(frames), np.asarray(self.ep_actions[i], np.int64),
                         np.asarray(self.ep_rewards[i], np.float32), dones)
            self.rows.extend(episode_to_rows(ep, self.cfg.max_segment_frames))
            self.buffered += len(frames)
            self.collected += len(frames)
            telemetry.count("frames_collected", len(frames), {"game": self.cfg.game})
            if ended:
                self.returns.append(float(np.sum(self.ep_rewards[i])))
        self.ep_frames[i], self.ep_actions[i], self.ep_rewards[i] = [], [], []
        self.ep_ids[i] = self._new_episode_id()
        if self.buffered >= self.cfg.shard_frames:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            write_shard(shard_uri(self.cfg.out, worker_prefix(self.index), self.next_shard), self.rows)
            self.next_shard += 1
        self.rows, self.buffered = [], 0

    def in_progress(self) -> int:
        return sum(len(f) for f in self.ep_frames)

    def step(self, num_steps: int) -> dict[str, Any]:
        """Advance every sub-env ``num_steps`` times (or until the budget is reached)."""
        for _ in range(num_steps):
            if self.collected + self.in_progress() >= self.budget:
                break
            actions = self.policy(self.obs)
            # The env autoresets on the step after an episode ends (gymnasium NEXT_STEP): that
            # step's action is ignored and its observation is the new episode's first frame, so
            # nothing is recorded for those sub-envs on that step.
            recording = ~self.resetting
            for i in np.flatnonzero(recording):
                self.ep_frames[i].append(self.obs[i])
                self.ep_actions[i].append(int(actions[i]))
            obs, rewards, terminated, truncated, _ = self.env.step(actions)
            ended = np.logical_or(terminated, truncated) & recording
            for i in np.flatnonzero(recording):
                self.ep_rewards[i].append(float(rewards[i]))
            # The observation returned with the end is a stand-in (Procgen never renders the
            # terminal frame), so the episode closes on the frames the policy acted on.
            for i in np.flatnonzero(ended):
                self._close_episode(int(i), ended=True)
            if hasattr(self.policy, "reset") and ended.any():
                self.policy.reset(ended)
            self.resetting = ended
            self.obs = obs
        return self.stats()

    def finish(self) -> dict[str, Any]:
        """Keep the unfinished episodes as (truncated) episodes and write the last shard."""
        for i in range(self.cfg.envs_per_worker):
            self._close_episode(i, ended=False)
        self._flush()
        self.env.close()
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {"collected": self.collected + self.in_progress(), "episodes_done": len(self.returns),
                "return_sum": float(np.sum(self.returns)), "budget": self.budget}


def _check_resume(cfg: CollectConfig) -> bool:
    """True if ``cfg.out`` holds an interrupted collection with the same settings."""
    record_uri = storage.join(cfg.out, COLLECT_CONFIG)
    if storage.exists(storage.join(cfg.out, "manifest.json")):
        m = read_manifest(cfg.out)
        raise CorpusError(
            f"{cfg.out}: already holds a finished corpus ({m.num_frames} frames of {m.game}); "
            "choose another --out or delete it to collect again"
        )
    if not storage.exists(record_uri):
        if storage.exists(storage.join(cfg.out, SHARD_DIR)) and storage.list_files(storage.join(cfg.out, SHARD_DIR)):
            raise CorpusError(f"{cfg.out}: has shards but no {COLLECT_CONFIG}; refusing to mix collections")
        return False
    old = storage.read_json(record_uri)
    new = config_to_dict(cfg)
    # A setting the record lacks counts at its default, so a collection recorded with fewer
    # settings still resumes.
    old = {k: old.get(k, getattr(CollectConfig(), k)) for k in _IDENTITY_FIELDS}
    diff = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in _IDENTITY_FIELDS if old[k] != new[k]]
    if diff:
        raise CorpusError(
            f"{cfg.out}: holds an unfinished collection made with other settings ({'; '.join(diff)}); "
            "run again with the same flags to resume, or choose another --out"
        )
    return True


def collect(cfg: CollectConfig, progress_interval: float = 5.0, policy_factories=None) -> Manifest:
    """Collect ``cfg.frames`` frames on ``cfg.num_workers`` Ray actors and return the manifest.
    Ray is joined or started (``runtime.init_ray``) only once the config and ``cfg.out`` pass.

    ``policy_factories`` maps a ``--collect.policy`` prefix to a factory for policies that live
    above the data layer (the jobs pass ``{"agent": rl.evaluate.AgentPolicy}``); see
    ``policies.make_policy``."""
    import ray  # lazy: jobs import this before they check their input (architecture.md, Imports)

    cfg.validate()
    resuming = _check_resume(cfg)
    init_ray()
    budgets, states = _start_corpus(cfg, resuming)
    already = sum(min(s[0], b) for s, b in zip(states, budgets))
    if resuming:
        print(f"resuming collection in {cfg.out}: {already:,} of {cfg.frames:,} frames already written", flush=True)

    remote_cls = ray.remote(num_cpus=cfg.worker_num_cpus)(Collector)
    actors = [
        remote_cls.options(name=f"collector-{cfg.game}-{i}").remote(
            cfg, i, max(budget - state[0], 0), state[1], state[2], policy_factories)
        for i, (budget, state) in enumerate(zip(budgets, states))
        if budget - state[0] > 0
    ]
    progress = Progress(cfg.frames, f"collect {cfg.game}", unit="frames", interval=progress_interval)
    progress.done = already
    chunk = max(1, 2048 // cfg.envs_per_worker)
    last = {a: 0 for a in actors}
    pending = {a.step.remote(chunk): a for a in actors}
    started = time.monotonic()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        actor = pending.pop(ready[0])
        stats = ray.get(ready[0])
        progress.update(stats["collected"] - last[actor])
        last[actor] = stats["collected"]
        if stats["collected"] < stats["budget"]:
            pending[actor.step.remote(chunk)] = actor
    finals = ray.get([a.finish.remote() for a in actors])
    for a, s in zip(actors, finals):
        progress.done += s["collected"] - last[a]
    progress.print()
    for a in actors:
        ray.kill(a)
    return _finish_corpus(cfg, finals, time.monotonic() - started)


def _finish_corpus(cfg: CollectConfig, finals: list[dict[str, Any]], seconds: float,
                   tool: str = "lapo_ray.data.collect") -> Manifest:
    """The manifest of the collectors' shards, written last: the corpus is complete."""
    made_by = {
        "tool": tool, "policy": cfg.policy, "epsilon": cfg.epsilon,
        "noise_hold": cfg.noise_hold, "seed": cfg.seed,
        "num_workers": cfg.num_workers, "envs_per_worker": cfg.envs_per_worker,
        "distribution_mode": cfg.distribution_mode, "num_levels": cfg.num_levels,
        "start_level": cfg.start_level, "seconds": round(seconds, 1),
        "mean_episode_return": (sum(s["return_sum"] for s in finals) / max(1, sum(s["episodes_done"] for s in finals))),
    }
    manifest = build_manifest(cfg.out, cfg.game, OBS_SHAPE, made_by)
    write_manifest(cfg.out, manifest)
    return manifest


def _start_corpus(cfg: CollectConfig, resuming: bool) -> tuple[list[int], list[tuple]]:
    """The corpus folder with its config (kept when resuming); each collector's frame budget and
    what it has already written."""
    storage.makedirs(storage.join(cfg.out, SHARD_DIR))
    if not resuming:
        storage.write_json(storage.join(cfg.out, COLLECT_CONFIG), config_to_dict(cfg))
    budgets = [cfg.frames // cfg.num_workers + (1 if i < cfg.frames % cfg.num_workers else 0)
               for i in range(cfg.num_workers)]
    return budgets, [existing_worker_state(cfg.out, i) for i in range(cfg.num_workers)]


def collect_local(cfg: CollectConfig, policy_factories=None) -> Manifest:
    """``collect`` without Ray, on this machine's cores: ``cfg.num_workers`` collectors, each in a
    process of its own (in this one for a single collector), writing the same corpus. For a
    machine that has no Ray (the paper-scale command on a lent GPU machine). A factory in
    ``policy_factories`` must be importable by name, as the processes are spawned."""
    cfg.validate()
    budgets, states = _start_corpus(cfg, _check_resume(cfg))
    jobs = [(cfg, i, budget - state[0], state[1], state[2], policy_factories)
            for i, (budget, state) in enumerate(zip(budgets, states)) if budget - state[0] > 0]
    started = time.monotonic()
    if len(jobs) <= 1:  # one collector (or none left after a resume) runs here
        finals = [_collect_all(*job) for job in jobs]
    else:
        # Spawned, not forked: the caller may hold CUDA or torch's threads, which a fork copies broken.
        with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_one_thread_each) as pool:
            finals = list(pool.map(_collect_all, *zip(*jobs)))
    print(f"collect {cfg.game}: {sum(s['collected'] for s in finals):,} frames in {time.monotonic() - started:.0f}s "
          f"on {len(jobs)} process(es)", flush=True)
    return _finish_corpus(cfg, finals, time.monotonic() - started, tool="lapo_ray.data.collect.collect_local")


def _one_thread_each() -> None:
    """A collector process per core: its policy's numerical libraries (OpenMP, read when they load,
    after this) take one thread each instead of every core each."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


def _collect_all(cfg: CollectConfig, index: int, budget: int, next_shard: int, next_episode: int,
                 policy_factories) -> dict[str, Any]:
    """One collector's whole budget, in this process."""
    collector = Collector(cfg, index, budget, next_shard, next_episode, policy_factories)
    chunk = max(1, 2048 // cfg.envs_per_worker)
    while collector.step(chunk)["collected"] < budget:
        pass
    return collector.finish()
