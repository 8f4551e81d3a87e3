"""Behaviour policies for collecting a corpus.

A policy is any object with ``__call__(obs) -> actions`` on a batch of uint8 frames
(N, H, W, C) returning int64 actions (N,), plus an optional ``reset(mask)`` called with a
boolean mask of sub-environments whose episodes just ended.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from lapo_ray import UsageError
from lapo_ray.envs import NUM_ACTIONS


class Policy(Protocol):
    def __call__(self, obs: np.ndarray) -> np.ndarray: ...


# ``PREFIX:ARG`` specs whose policy lives in a layer above data (``agent:PATH``, a trained
# agent, needs RLlib): the caller hands the factory in, ``factory(ARG, num_envs=, seed=)``.
PolicyFactory = Callable[..., Policy]


class RandomPolicy:
    """Uniform random actions."""

    def __init__(self, num_envs: int, seed: int = 0, num_actions: int = NUM_ACTIONS):
        self.rng = np.random.default_rng(seed)
        self.num_envs, self.num_actions = num_envs, num_actions

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.integers(0, self.num_actions, size=len(obs), dtype=np.int64)

    def reset(self, mask: np.ndarray) -> None:
        pass


class StickyRandomPolicy(RandomPolicy):
    """Random actions held for several steps: repeat the last action with probability ``p``.

    Held actions move the agent far enough that a move is visible in o[t+1] - o[t] more often
    than under per-step uniform noise, which is what a small IDM needs to pick actions up.
    Every action still appears at the same marginal rate (uniform), so probes stay fair.
    """

    def __init__(self, num_envs: int, repeat_prob: float, seed: int = 0, num_actions: int = NUM_ACTIONS):
        if not 0.0 <= repeat_prob < 1.0:
            raise UsageError(f"sticky policy repeat probability must be in [0, 1), got {repeat_prob}")
        super().__init__(num_envs, seed, num_actions)
        self.repeat_prob = repeat_prob
        self.last = self.rng.integers(0, num_actions, size=num_envs, dtype=np.int64)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        fresh = self.rng.integers(0, self.num_actions, size=len(obs), dtype=np.int64)
        keep = self.rng.random(len(obs)) < self.repeat_prob
        self.last = np.where(keep, self.last, fresh)
        return self.last.copy()


class EpsilonPolicy:
    """Another policy with behaviour noise: each sub-environment's action is replaced, with
    probability ``epsilon`` per step, by a uniform random one.

    The usual way offline-RL corpora get coverage (D4RL's noisy experts, epsilon-greedy
    collection): an expert that has converged on one action for most states (as CoinRun's
    demonstrator has: docs/results/identifiability.md) shows the other actions' effects only through
    this noise, and an action that never appears cannot be told from the others by any IDM.

    With ``hold`` > 0 the noise comes in excursions: a random action, once drawn, is held for
    another step with probability ``hold`` (mean length 1 / (1 - hold)) before the base policy
    takes over again, so ``epsilon / (epsilon + 1 - hold)`` of the steps are noise
    (``CollectConfig.noise_share``). In CoinRun
    the action sets an acceleration: one odd step moves the agent by about a pixel, a held one
    moves it and the camera visibly, so held noise shows the action where per-step noise barely
    does (docs/results/identifiability.md).
    """

    def __init__(self, base: Policy, epsilon: float, num_envs: int, seed: int = 0,
                 num_actions: int = NUM_ACTIONS, hold: float = 0.0):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"collection epsilon must be in [0, 1], got {epsilon}")
        if not 0.0 <= hold < 1.0:
            raise ValueError(f"collection noise hold must be in [0, 1), got {hold}")
        self.base, self.epsilon, self.num_actions, self.hold = base, epsilon, num_actions, hold
        # Its own stream: the base policy's sampling stays what it would be without the noise.
        self.rng = np.random.default_rng([seed, 0xE95])
        self.held = np.full(num_envs, -1, np.int64)  # the excursion's action; -1: the base acts

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        actions = np.asarray(self.base(obs), np.int64)
        n = len(actions)
        if self.hold == 0.0:
            noisy = self.rng.random(n) < self.epsilon
            return np.where(noisy, self.rng.integers(0, self.num_actions, size=n), actions)
        held = self.held >= 0
        keep = held & (self.rng.random(n) < self.hold)
        # An excursion that ends hands this step back to the base policy.
        start = ~held & (self.rng.random(n) < self.epsilon)
        fresh = self.rng.integers(0, self.num_actions, size=n)
        self.held = np.where(keep, self.held, np.where(start, fresh, -1))
        return np.where(self.held >= 0, self.held, actions)

    def reset(self, mask: np.ndarray) -> None:
        self.held[np.asarray(mask, bool)] = -1  # an excursion does not outlive its episode
        if hasattr(self.base, "reset"):
            self.base.reset(mask)


def make_policy(spec: str, num_envs: int, seed: int = 0,
                factories: Mapping[str, PolicyFactory] | None = None) -> Policy:
    """Build a policy from its command-line spec.

    ``random``; ``sticky:P``; ``PREFIX:ARG`` for a prefix in ``factories`` (the jobs pass
    ``agent``: ``agent:PATH`` is a trained agent, a ``jobs/finetune.py`` or ``jobs/decode.py``
    output folder); or ``package.module:factory``, a callable taking ``(num_envs=..., seed=...)``
    and returning a policy.
    """
    prefix, _, arg = spec.partition(":")
    if factories and prefix in factories:
        return factories[prefix](arg, num_envs=num_envs, seed=seed)
    if spec == "random":
        return RandomPolicy(num_envs, seed)
    if spec.startswith("sticky:"):
        try:
            p = float(spec.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"policy {spec!r}: expected 'sticky:P' with P a number in [0, 1)") from None
        return StickyRandomPolicy(num_envs, p, seed)
    if prefix == "agent":
        raise UsageError(f"policy {spec!r}: a trained agent collects only through a job (jobs/collect.py, "
                         "jobs/pretrain.py, jobs/experiment.py), which passes collect() its agent loader")
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"policy {spec!r}: cannot load {name!r} from {module!r} ({e})") from e
        return factory(num_envs=num_envs, seed=seed)
    raise UsageError(f"policy {spec!r}: expected 'random', 'sticky:P', 'agent:PATH' or 'module:factory'")
