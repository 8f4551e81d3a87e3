"""Procgen as a gymnasium 1.x ``VectorEnv`` over procgen's own C++ vectorisation.

One ``ProcgenGym3Env`` steps all sub-environments in native threads, which is far faster than
one Python env per sub-env. This module adapts its gym3 interface (``act`` / ``observe``) to the
gymnasium vector API that RLlib's new-stack ``SingleAgentEnvRunner`` consumes through
``config.env_runners(gym_env_vectorize_mode="vector_entry_point")``.

Autoreset: ``AutoresetMode.NEXT_STEP``
--------------------------------------
Procgen resets a sub-env inside the very step that ends its episode; the frame it returns with
``first=True`` already belongs to the next level. RLlib 2.60's ``SingleAgentEnvRunner`` however
expects gymnasium's NEXT_STEP protocol: after a sub-env reports ``terminated or truncated`` it
starts a new episode object and feeds the *next* ``step()``'s observation to ``add_env_reset``,
ignoring that step's action and reward. Passing procgen's same-step semantics straight through
would make RLlib store the new level's first frame as the old episode's last observation and
then take the new episode's *second* frame as its reset observation (a lost transition and a
corrupted start state). So this class implements NEXT_STEP exactly:

* On the step where sub-env ``i`` ends, ``terminated[i] or truncated[i]`` is True, the reward is
  the episode's final reward, and the observation is the *last frame procgen rendered for that
  episode* (the one the final action was chosen on). Procgen never renders the true terminal
  frame, so some stand-in is unavoidable; we pick the ending episode's own last frame rather than
  a frame of the next level because it is the better input for value bootstrapping on a
  truncation and never mixes two levels in one episode.
* On the following step, sub-env ``i``'s action is ignored: we send procgen its force-reset
  action (-1), which ends the level procgen had already started and generates a fresh one. The
  observation returned is that fresh level's genuine first frame, with reward 0 and
  ``terminated = truncated = False``. The level procgen pre-started is discarded; level seeds are
  drawn i.i.d. from the same distribution, so the level distribution is unchanged.

Terminated vs truncated
-----------------------
gym3 only reports ``first``; its info holds ``prev_level_seed``, ``prev_level_complete`` and
``level_seed`` and no time-limit flag. Procgen ends an episode on a time limit when its step
counter reaches the game's ``timeout`` (procgen ``src/game.cpp``: 1000 steps by default, set per
game in ``src/games/*.cpp``). We therefore report ``truncated`` when an episode ends exactly at the
timeout without the level being completed, and ``terminated`` otherwise. The only ambiguity is an
agent dying on the very last allowed step, which is reported as truncated.

Episode statistics
------------------
When sub-env ``i`` ends an episode, ``info`` follows gymnasium's ``RecordEpisodeStatistics``
layout (which ``DictInfoToList``, used by RLlib, splits per sub-env)::

    info["episode"] = {"r": float32 (N,),           # undiscounted return of the episode
                       "l": int64 (N,),             # its length in agent steps
                       "level_complete": bool (N,)} # procgen's success flag for the level
    info["_episode"] = bool (N,)                     # which sub-envs ended on this step

Entries where ``_episode`` is False are zero. The key is absent on steps where nothing ended.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from lapo_ray.config.data import PROCGEN_GAMES, check_game

__all__ = [
    "ACTION_NAMES",
    "PROCGEN_GAMES",
    "DISTRIBUTION_MODES",
    "NUM_ACTIONS",
    "OBS_SHAPE",
    "ProcgenVectorEnv",
    "episode_timeout",
    "make_procgen_vector_env",
    "register_with_rllib",
]


DISTRIBUTION_MODES: Final[tuple[str, ...]] = ("easy", "hard", "extreme", "memory", "exploration")

# Modes only some games implement. Procgen checks these with a C++ assert that aborts the whole
# process (src/game.cpp, Game::parse_options; exploration in procgen/env.py), so we check first.
_MODE_GAMES: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "extreme": frozenset({"chaser", "dodgeball", "leaper", "starpilot"}),
        "memory": frozenset({"caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"}),
        "exploration": frozenset(
            {"caveflyer", "climber", "coinrun", "heist", "jumper", "leaper", "maze", "ninja"}
        ),
    }
)

# Episode step limits from procgen's C++ (src/game.cpp default; constructors in src/games/).
_DEFAULT_TIMEOUT: Final[int] = 1000
_GAME_TIMEOUTS: Final[Mapping[str, int]] = MappingProxyType(
    {"bigfish": 6000, "bossfight": 4000, "leaper": 500, "maze": 500, "plunder": 4000}
)

# Procgen's one action set for every game (procgen/env.py, get_combos): the arrow combinations,
# then the game-specific keys, which a game that has no use for them treats as a no-op.
ACTION_NAMES: Final[tuple[str, ...]] = (
    "LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NOOP", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP",
    "D", "A", "W", "S", "Q", "E",
)
NUM_ACTIONS: Final[int] = len(ACTION_NAMES)
OBS_SHAPE: Final[tuple[int, int, int]] = (64, 64, 3)
_FORCE_RESET_ACTION: Final[int] = -1  # Game::step treats action -1 as "end and reset now".
_INT32_MAX: Final[int] = 2**31 - 1


def _check_game_and_mode(game: str, distribution_mode: str) -> None:
    check_game(game, "game")
    if distribution_mode not in DISTRIBUTION_MODES:
        raise ValueError(
            f"Unknown distribution_mode {distribution_mode!r}; "
            f"valid modes: {', '.join(DISTRIBUTION_MODES)}"
        )
    allowed = _MODE_GAMES.get(distribution_mode)
    if allowed is not None and game not in allowed:
        raise ValueError(
            f"Procgen game {game!r} does not support distribution_mode {distribution_mode!r}; "
            f"games that do: {', '.join(sorted(allowed))}"
        )


def episode_timeout(game: str, distribution_mode: str = "easy") -> int:
    """Number of steps after which procgen ends an episode of ``game`` on its time limit."""
    _check_game_and_mode(game, distribution_mode)
    if game == "jumper" and distribution_mode == "memory":
        return 2000  # src/games/jumper.cpp raises the limit for its memory mode only.
    return _GAME_TIMEOUTS.get(game, _DEFAULT_TIMEOUT)


def _check_int(name: str, value: Any, low: int, high: int = _INT32_MAX) -> int:
    # Procgen reads these options as C int32; bool is excluded because it is an int subclass.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _import_procgen():
    """procgen's env class, imported only when an env is made, so that jobs (and their one-line
    errors) that never step Procgen never import it. procgen imports the old gym, whose first import
    prints gym_notices' four-line "Gym has been unmaintained" banner to stderr, in every Collector
    and env runner process: the banner is taken out of what the import prints, nothing else is."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            from procgen import ProcgenGym3Env
    finally:  # what a failed import printed is kept for its traceback
        sys.stderr.write(_without_gym_notice(captured.getvalue()))
    return ProcgenGym3Env


def _without_gym_notice(printed: str) -> str:
    try:
        import gym
        from gym_notices.notices import notices
    except ImportError:  # no gym, or a gym without its notices: nothing printed a banner
        return printed
    notice = notices.get(gym.__version__)
    return printed.replace(notice + "\n", "", 1) if notice else printed


class ProcgenVectorEnv(VectorEnv):
    """``num_envs`` copies of one Procgen game behind the gymnasium 1.x vector API.

    Observations are uint8 ``(num_envs, 64, 64, 3)`` (HWC, procgen's layout), actions are ints in
    ``[0, 15)``, rewards float32, ``terminated``/``truncated`` bool. Autoreset follows
    ``AutoresetMode.NEXT_STEP``; episode statistics appear in ``info["episode"]`` (see the module
    docstring for both).

    Args:
        game: One of :data:`PROCGEN_GAMES`.
        num_envs: Number of sub-environments, all stepped by one native procgen instance.
        distribution_mode: One of :data:`DISTRIBUTION_MODES` that ``game`` supports.
        num_levels: Size of the level set (0 = unbounded). Must stay 0 in exploration mode.
        start_level: First level seed of the set. Must stay 0 in exploration mode.
        seed: Procgen's ``rand_seed`` (drives level sampling and game randomness); ``None`` draws
            one from the OS. ``reset(seed=...)`` re-seeds.
        render_mode: ``None`` or ``"rgb_array"`` (512x512 frames from :meth:`render`; slower).
        num_threads: Procgen worker threads; default ``min(4, usable CPUs)`` since procgen's own
            default of 4 oversubscribes small machines.
    """

    metadata: dict[str, Any] = {
        "autoreset_mode": AutoresetMode.NEXT_STEP,
        "render_modes": ["rgb_array"],
        "render_fps": 15,
    }

    def __init__(
        self,
        game: str,
        num_envs: int,
        distribution_mode: str = "easy",
        num_levels: int = 0,
        start_level: int = 0,
        seed: int | None = None,
        render_mode: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        _check_game_and_mode(game, distribution_mode)
        self.num_envs = _check_int("num_envs", num_envs, 1)
        num_levels = _check_int("num_levels", num_levels, 0)
        start_level = _check_int("start_level", start_level, 0)
        if distribution_mode == "exploration" and (num_levels, start_level) != (0, 0):
            raise ValueError(
                "distribution_mode 'exploration' fixes its own level; "
                "leave num_levels and start_level at 0"
            )
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(
                f"Unsupported render_mode {render_mode!r}; valid: None, "
                f"{', '.join(self.metadata['render_modes'])}"
            )
        if num_threads is None:
            num_threads = min(4, len(os.sched_getaffinity(0)))

        self.game = game
        self.distribution_mode = distribution_mode
        self.num_levels = num_levels
        self.start_level = start_level
        self.render_mode = render_mode
        self.timeout = episode_timeout(game, distribution_mode)
        self._num_threads = _check_int("num_threads", num_threads, 1, 64)

        self.single_observation_space = gym.spaces.Box(0, 255, OBS_SHAPE, np.uint8)
        self.single_action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self._env = self._make_procgen(seed)
        self._fresh = True  # procgen starts every sub-env on a new level when it is created.
        n = self.num_envs
        self._autoreset = np.zeros(n, dtype=bool)
        self._episode_return = np.zeros(n, dtype=np.float64)
        self._episode_length = np.zeros(n, dtype=np.int64)
        self._last_obs = np.zeros(self.observation_space.shape, dtype=np.uint8)

    def _make_procgen(self, seed: int | None):
        ProcgenGym3Env = _import_procgen()
        kwargs: dict[str, Any] = {}
        if self.distribution_mode != "exploration":  # procgen rejects these keys there.
            kwargs.update(num_levels=self.num_levels, start_level=self.start_level)
        return ProcgenGym3Env(
            num=self.num_envs,
            env_name=self.game,
            distribution_mode=self.distribution_mode,
            rand_seed=None if seed is None else _check_int("seed", seed, 0),
            num_threads=self._num_threads,
            render_mode=self.render_mode,
            **kwargs,
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new episode in every sub-env; with ``seed``, rebuild procgen with that seed.

        Seeding is per vector (procgen derives all sub-env streams from one ``rand_seed``), so a
        list of seeds is rejected. Partial resets (``options["reset_mask"]``) are unsupported:
        procgen steps all sub-envs together, so one cannot be reset without stepping the others.
        """
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int or None (one seed per vector), got {seed!r}")
        if options:
            raise ValueError(f"ProcgenVectorEnv.reset takes no options, got {sorted(options)}")
        super().reset(seed=seed)
        if seed is not None:
            self._env.close()
            self._env = self._make_procgen(int(seed))
        elif not self._fresh:
            self._env.act(np.full(self.num_envs, _FORCE_RESET_ACTION, dtype=np.int32))
        self._fresh = False
        self._autoreset[:] = False
        self._episode_return[:] = 0.0
        self._episode_length[:] = 0
        _, ob, _ = self._env.observe()
        obs = ob["rgb"]
        self._last_obs = obs.copy()
        return obs, {}

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every sub-env once (NEXT_STEP autoreset, see the module docstring)."""
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(
                f"actions must be integers of shape ({self.num_envs},), "
                f"got dtype {actions.dtype} shape {actions.shape}"
            )
        if actions.min() < 0 or actions.max() >= NUM_ACTIONS:
            raise ValueError(f"actions must lie in [0, {NUM_ACTIONS}), got {actions}")
        self._fresh = False

        resetting = self._autoreset
        procgen_actions = actions.astype(np.int32)
        procgen_actions[resetting] = _FORCE_RESET_ACTION
        self._env.act(procgen_actions)
        reward, ob, first = self._env.observe()
        obs = ob["rgb"]
        reward = reward.astype(np.float32)
        reward[resetting] = 0.0  # the discarded level's step; NEXT_STEP resets carry no reward.

        stepping = ~resetting
        self._episode_return[stepping] += reward[stepping]
        self._episode_length[stepping] += 1
        done = first.astype(bool) & stepping
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        info: dict[str, Any] = {}
        if done.any():
            level_complete = np.array(
                [bool(i["prev_level_complete"]) for i in self._env.get_info()], dtype=bool
            )
            level_complete &= done
            truncated = done & ~level_complete & (self._episode_length >= self.timeout)
            terminated = done & ~truncated
            info["episode"] = {
                "r": np.where(done, self._episode_return, 0.0).astype(np.float32),
                "l": np.where(done, self._episode_length, 0),
                "level_complete": level_complete,
            }
            info["_episode"] = done
            self._episode_return[done] = 0.0
            self._episode_length[done] = 0
            obs[done] = self._last_obs[done]  # stand-in final frame, see module docstring.

        self._autoreset = done
        self._last_obs = obs.copy()  # callers may modify what we hand back in place.
        return obs, reward, terminated, truncated, info

    def render(self) -> tuple[np.ndarray, ...] | None:
        """512x512 RGB frames of every sub-env when ``render_mode="rgb_array"``, else ``None``."""
        if self.render_mode is None:
            return None
        return tuple(i["rgb"] for i in self._env.get_info())

    def close_extras(self, **kwargs: Any) -> None:
        """Free procgen's native environments."""
        env = getattr(self, "_env", None)  # absent if __init__ failed before creating it.
        if env is not None:
            env.close()

    def __repr__(self) -> str:
        return (
            f"ProcgenVectorEnv(game={self.game!r}, num_envs={self.num_envs}, "
            f"distribution_mode={self.distribution_mode!r}, num_levels={self.num_levels}, "
            f"start_level={self.start_level})"
        )


_CREATOR_KEYS: Final[frozenset[str]] = frozenset(
    {"game", "num_envs", "distribution_mode", "num_levels", "start_level", "seed",
     "render_mode", "num_threads"}
)  # fmt: skip


def make_procgen_vector_env(env_config: Mapping[str, Any]) -> ProcgenVectorEnv:
    """Build a :class:`ProcgenVectorEnv` from an RLlib ``env_config`` mapping.

    Keys: ``game`` (required), ``num_envs`` (default 1; RLlib's vector entry point sets it to
    ``num_envs_per_env_runner``), ``distribution_mode``, ``num_levels``, ``start_level``,
    ``seed``, ``render_mode``, ``num_threads``. Unknown keys raise, so typos do not pass silently.

    Seeding across env runners: RLlib hands the creator a plain dict without the runner's
    ``worker_index``, so a fixed ``seed`` here would give every runner the same levels. Prefer
    ``config.debugging(seed=...)``: RLlib then calls ``reset(seed=seed + worker_index)``. With no
    seed at all, every runner draws its own from the OS.
    """
    unknown = set(env_config) - _CREATOR_KEYS
    if unknown:
        raise ValueError(
            f"Unknown ProcgenVectorEnv config keys {sorted(unknown)}; "
            f"valid keys: {', '.join(sorted(_CREATOR_KEYS))}"
        )
    if "game" not in env_config:
        raise ValueError(f"env_config needs a 'game', one of: {', '.join(PROCGEN_GAMES)}")
    kwargs = dict(env_config)
    return ProcgenVectorEnv(game=kwargs.pop("game"), num_envs=kwargs.pop("num_envs", 1), **kwargs)


def register_with_rllib(name: str = "lapo_procgen") -> str:
    """Register :func:`make_procgen_vector_env` with Ray Tune's env registry; return ``name``.

    Use with ``config.environment(env=name, env_config={"game": ...})`` and
    ``config.env_runners(gym_env_vectorize_mode="vector_entry_point")``.
    """
    # lazy: envs sits on the paths without Ray (train/stages.py, the step benchmark)
    from ray.tune.registry import register_env

    register_env(name, make_procgen_vector_env)
    return name
