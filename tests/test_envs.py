"""Tests for lapo_ray.envs against the real procgen library."""

from __future__ import annotations

from collections.abc import Iterator

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from lapo_ray.envs import (
    EXPERT_RETURNS,
    PROCGEN_GAMES,
    RANDOM_RETURNS,
    ProcgenVectorEnv,
    episode_timeout,
    make_procgen_vector_env,
    normalize_return,
)


def _random_actions(seed: int, steps: int, num_envs: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 15, size=(steps, num_envs))


@pytest.fixture
def coinrun() -> Iterator[ProcgenVectorEnv]:
    env = ProcgenVectorEnv("coinrun", num_envs=4, seed=0)
    yield env
    env.close()


# --- spaces, dtypes, construction ------------------------------------------------------------


def test_spaces_and_dtypes(coinrun: ProcgenVectorEnv) -> None:
    env = coinrun
    assert env.single_observation_space == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    assert env.observation_space.shape == (4, 64, 64, 3)
    assert env.observation_space.dtype == np.uint8
    assert env.single_action_space == gym.spaces.Discrete(15)
    assert env.action_space == gym.spaces.MultiDiscrete([15] * 4)
    assert env.metadata["autoreset_mode"] is AutoresetMode.NEXT_STEP

    obs, info = env.reset()
    assert info == {}
    assert obs.dtype == np.uint8 and obs.shape == (4, 64, 64, 3)
    assert env.observation_space.contains(obs)
    assert obs.max() > 0  # a rendered frame, not an empty buffer

    obs, rew, term, trunc, info = env.step(env.action_space.sample())
    assert obs.dtype == np.uint8 and obs.shape == (4, 64, 64, 3)
    assert rew.dtype == np.float32 and rew.shape == (4,)
    assert term.dtype == np.bool_ and term.shape == (4,)
    assert trunc.dtype == np.bool_ and trunc.shape == (4,)
    assert isinstance(info, dict)


@pytest.mark.parametrize("game", PROCGEN_GAMES)
def test_every_game_constructs_and_steps(game: str) -> None:
    env = ProcgenVectorEnv(game, num_envs=2, seed=1)
    obs, _ = env.reset()
    obs, rew, *_ = env.step(np.array([4, 7]))
    assert obs.shape == (2, 64, 64, 3) and rew.shape == (2,)
    env.close()
    assert env.closed


def test_unknown_game_message_lists_valid_games() -> None:
    with pytest.raises(ValueError, match="'coinrunn'") as err:
        ProcgenVectorEnv("coinrunn", num_envs=1)
    assert all(game in str(err.value) for game in PROCGEN_GAMES)


def test_unknown_distribution_mode_message_lists_valid_modes() -> None:
    with pytest.raises(ValueError, match="'medium'") as err:
        ProcgenVectorEnv("coinrun", num_envs=1, distribution_mode="medium")
    assert all(mode in str(err.value) for mode in ("easy", "hard", "extreme", "memory"))


def test_mode_unsupported_by_game_is_rejected_before_procgen_aborts() -> None:
    # procgen's C++ would fassert (kill the interpreter) on this combination.
    with pytest.raises(ValueError, match="'coinrun' does not support distribution_mode 'extreme'"):
        ProcgenVectorEnv("coinrun", num_envs=1, distribution_mode="extreme")
    with pytest.raises(ValueError, match="leave num_levels and start_level at 0"):
        ProcgenVectorEnv("maze", num_envs=1, distribution_mode="exploration", num_levels=5)
    env = ProcgenVectorEnv("maze", num_envs=1, distribution_mode="memory")
    assert env.timeout == 500
    env.close()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_envs": 0}, ValueError),
        ({"num_envs": 2.0}, TypeError),
        ({"num_envs": 1, "num_levels": -1}, ValueError),
        ({"num_envs": 1, "seed": 2**31}, ValueError),
        ({"num_envs": 1, "render_mode": "human"}, ValueError),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        ProcgenVectorEnv("coinrun", **kwargs)


def test_bad_actions_and_reset_arguments(coinrun: ProcgenVectorEnv) -> None:
    coinrun.reset()
    with pytest.raises(ValueError, match="shape"):
        coinrun.step(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        coinrun.step(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 15\)"):
        coinrun.step(np.array([0, 1, 15, 2]))
    with pytest.raises(ValueError, match=r"\[0, 15\)"):
        coinrun.step(np.array([0, -1, 1, 2]))  # -1 is procgen's private force-reset action
    with pytest.raises(TypeError, match="one seed per vector"):
        coinrun.reset(seed=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="reset_mask"):
        coinrun.reset(options={"reset_mask": np.ones(4, dtype=bool)})


def test_episode_timeouts_match_procgen_sources() -> None:
    assert episode_timeout("coinrun") == 1000
    assert episode_timeout("maze") == 500
    assert episode_timeout("bigfish") == 6000
    assert episode_timeout("jumper") == 1000
    assert episode_timeout("jumper", "memory") == 2000


# --- determinism and levels -------------------------------------------------------------------


def _rollout(env: ProcgenVectorEnv, actions: np.ndarray, seed: int | None = None):
    obs, _ = env.reset(seed=seed)
    frames, rewards, dones = [obs], [], []
    for a in actions:
        obs, rew, term, trunc, _ = env.step(a)
        frames.append(obs)
        rewards.append(rew)
        dones.append(term | trunc)
    return np.stack(frames), np.stack(rewards), np.stack(dones)


def test_same_seed_same_actions_same_trajectory() -> None:
    actions = _random_actions(0, 150, 4)
    a = _rollout(ProcgenVectorEnv("starpilot", 4, seed=123), actions)
    b = _rollout(ProcgenVectorEnv("starpilot", 4, seed=123), actions)
    # reset(seed=...) re-seeds an env built with another seed (what RLlib does per runner).
    c = _rollout(ProcgenVectorEnv("starpilot", 4, seed=5), actions, seed=123)
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    assert a[2].any(), "some episode should end so that autoreset is covered too"
    other = _rollout(ProcgenVectorEnv("starpilot", 4, seed=124), actions)
    assert not np.array_equal(a[0], other[0])


def test_start_level_selects_the_level() -> None:
    def first_frame(start_level: int, seed: int) -> np.ndarray:
        env = ProcgenVectorEnv("leaper", 3, num_levels=1, start_level=start_level, seed=seed)
        obs, _ = env.reset()
        env.close()
        assert (obs == obs[0]).all(), "num_levels=1: every sub-env plays the same level"
        return obs[0]

    level7 = first_frame(7, seed=0)
    np.testing.assert_array_equal(level7, first_frame(7, seed=99))  # level, not rand_seed
    assert not np.array_equal(level7, first_frame(8, seed=0))


# --- autoreset and episode statistics ---------------------------------------------------------


def test_next_step_autoreset_and_episode_statistics() -> None:
    n = 8
    env = ProcgenVectorEnv("starpilot", n, seed=7)
    prev_obs, _ = env.reset()
    ret, length = np.zeros(n), np.zeros(n, dtype=int)
    pending_reset = np.zeros(n, dtype=bool)
    ended: list[tuple[float, int]] = []
    for actions in _random_actions(1, 250, n):
        obs, rew, term, trunc, info = env.step(actions)
        done = term | trunc
        mask = info.get("_episode", np.zeros(n, dtype=bool))
        np.testing.assert_array_equal(mask, done)
        # NEXT_STEP: the step after an ending is the reset step, with no reward and no ending.
        assert (rew[pending_reset] == 0).all() and not done[pending_reset].any()
        ret[pending_reset], length[pending_reset] = 0.0, 0
        stepped = ~pending_reset
        ret[stepped] += rew[stepped]
        length[stepped] += 1
        for i in np.flatnonzero(done):
            assert info["episode"]["r"][i] == pytest.approx(ret[i], abs=1e-4)
            assert info["episode"]["l"][i] == length[i]
            # procgen never renders the terminal frame: the episode's last frame stands in.
            np.testing.assert_array_equal(obs[i], prev_obs[i])
            ended.append((float(ret[i]), int(length[i])))
        if mask.any():
            assert (info["episode"]["r"][~mask] == 0).all()
            assert (info["episode"]["l"][~mask] == 0).all()
        pending_reset = done
        prev_obs = obs
    env.close()
    assert len(ended) >= 5
    assert all(1 <= l <= episode_timeout("starpilot") for _, l in ended)
    assert any(r > 0 for r, _ in ended), "returns should be non-trivial for the check to bite"


def test_reset_step_returns_a_genuine_first_frame() -> None:
    # With a single level every episode starts from the same frame, so the reset step's
    # observation must equal reset()'s. (Procgen's own pre-started level would already be one
    # step in if the ignored action had been applied to it.)
    n = 8
    env = ProcgenVectorEnv("bossfight", n, num_levels=1, start_level=3, seed=0)
    obs, _ = env.reset()
    first = obs[0].copy()
    pending_reset = np.zeros(n, dtype=bool)
    resets_seen = 0
    for actions in _random_actions(2, 150, n):
        obs, _, term, trunc, _ = env.step(actions)
        for i in np.flatnonzero(pending_reset):
            np.testing.assert_array_equal(obs[i], first)
            resets_seen += 1
        pending_reset = term | trunc
    env.close()
    assert resets_seen >= 3


def test_maze_time_limit_is_truncation_and_goal_is_termination() -> None:
    # In maze an episode ends only at the cheese (+10, level complete) or at the 500-step limit.
    n = 16
    env = ProcgenVectorEnv("maze", n, seed=0)
    env.reset()
    truncations = terminations = 0
    for actions in _random_actions(3, 520, n):
        _, _, term, trunc, info = env.step(actions)
        assert not (term & trunc).any()
        for i in np.flatnonzero(term | trunc):
            r, l = info["episode"]["r"][i], info["episode"]["l"][i]
            complete = info["episode"]["level_complete"][i]
            if trunc[i]:
                truncations += 1
                assert (l, r, complete) == (500, 0.0, False)
            else:
                terminations += 1
                assert l < 500 and r == 10.0 and complete
    env.close()
    assert truncations >= 1 and terminations >= 1


def test_reset_without_seed_starts_new_episodes() -> None:
    env = ProcgenVectorEnv("coinrun", num_envs=8, seed=0)
    env.reset()
    for actions in _random_actions(4, 5, 8):
        env.step(actions)
    env.reset()
    # Statistics restart from the reset: no episode can end with more steps than were taken since.
    # CoinRun's time limit is 1000 steps, so every sub-env ends at least once in 1000 steps.
    ended, t = np.zeros(8, bool), 0
    rng = np.random.default_rng(5)
    while not ended.all():
        t += 1
        assert t <= 1000, f"sub-envs {np.flatnonzero(~ended)} never ended"
        _, _, term, trunc, info = env.step(rng.integers(0, 15, 8))
        done = term | trunc
        if done.any():
            assert np.array_equal(info["_episode"], done)
            lengths = info["episode"]["l"][done]
            assert (lengths <= t).all() and (lengths >= 1).all(), (t, lengths)
            ended |= done
    env.close()


def test_rgb_array_render() -> None:
    env = ProcgenVectorEnv("coinrun", 2, seed=0, render_mode="rgb_array")
    env.reset()
    frames = env.render()
    assert len(frames) == 2 and frames[0].shape == (512, 512, 3) and frames[0].dtype == np.uint8
    env.close()
    assert ProcgenVectorEnv("coinrun", 1).render() is None


# --- creator for RLlib ------------------------------------------------------------------------


def test_creator_reads_env_config() -> None:
    env = make_procgen_vector_env(
        {"game": "ninja", "num_envs": 3, "distribution_mode": "hard", "num_levels": 10,
         "start_level": 2, "seed": 4}
    )  # fmt: skip
    assert (env.game, env.num_envs, env.distribution_mode) == ("ninja", 3, "hard")
    assert (env.num_levels, env.start_level) == (10, 2)
    assert env.reset()[0].shape == (3, 64, 64, 3)
    env.close()
    assert make_procgen_vector_env({"game": "ninja"}).num_envs == 1
    with pytest.raises(ValueError, match="num_env'"):
        make_procgen_vector_env({"game": "ninja", "num_env": 3})
    with pytest.raises(ValueError, match="needs a 'game'"):
        make_procgen_vector_env({"num_envs": 3})


# --- normalisation ----------------------------------------------------------------------------


def test_normalize_return_coinrun_by_hand() -> None:
    # LAPO's table: coinrun random 2.704834, expert 9.93251; (10 - 2.704834) / 7.227676.
    assert normalize_return("coinrun", 10.0) == pytest.approx(7.295166 / 7.227676, rel=1e-12)
    assert isinstance(normalize_return("coinrun", 10.0), float)
    out = normalize_return("coinrun", np.array([2.704834, 9.93251, 6.318672]))
    assert isinstance(out, np.ndarray) and out.shape == (3,)
    np.testing.assert_allclose(out, [0.0, 1.0, 0.5], atol=1e-12)


def test_normalization_tables_cover_all_games() -> None:
    assert set(RANDOM_RETURNS) == set(EXPERT_RETURNS) == set(PROCGEN_GAMES)
    for game in PROCGEN_GAMES:
        assert EXPERT_RETURNS[game] > RANDOM_RETURNS[game]
        assert normalize_return(game, RANDOM_RETURNS[game]) == pytest.approx(0.0, abs=1e-12)
        assert normalize_return(game, EXPERT_RETURNS[game]) == pytest.approx(1.0)
    assert RANDOM_RETURNS["fruitbot"] == -2.5330205  # spot checks against LAPO env_utils.py
    assert EXPERT_RETURNS["starpilot"] == 66.98625


def test_normalize_return_unknown_game() -> None:
    with pytest.raises(ValueError, match="'pong'.*known games: bigfish"):
        normalize_return("pong", 1.0)


# --- RLlib ------------------------------------------------------------------------------------


# RLlib PPO on this env (vector_entry_point, 2 env runners) is exercised by tests/test_rl.py.


def test_action_names_are_procgens_own_key_combinations_in_order():
    from procgen.env import ProcgenGym3Env

    from lapo_ray.envs import ACTION_NAMES, NUM_ACTIONS

    combos = ProcgenGym3Env.get_combos(None)  # a plain list; it reads nothing of the instance
    assert NUM_ACTIONS == len(combos) == 15
    assert list(ACTION_NAMES) == ["+".join(keys) or "NOOP" for keys in combos]
    assert ACTION_NAMES[4] == "NOOP" and ACTION_NAMES[8] == "RIGHT+UP"


def test_making_an_env_prints_no_gym_banner() -> None:
    """procgen's import of the old gym printed gym_notices' four-line "Gym has been unmaintained"
    banner to stderr, once in every Collector and env runner process of a job's console."""
    import subprocess
    import sys

    code = ("import sys; from lapo_ray.envs import ProcgenVectorEnv; ProcgenVectorEnv('coinrun', 1).reset(seed=0); "
            "print('imported gym:', 'gym' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "imported gym: True"  # the banner's source was imported ...
    assert "Gym" not in r.stderr and "gymnasium.farama.org" not in r.stderr, r.stderr  # ... and said nothing
