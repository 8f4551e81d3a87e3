"""The probe as an instrument: on synthetic latents with a known amount of action information, it
must read that amount (Bayes rate, majority rate, mutual information) and pick its epoch honestly."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from lapo_ray.config import ProbeConfig
from lapo_ray.envs import NUM_ACTIONS
from lapo_ray.evaluation.probe import (
    code_action_nmi,
    codebook_perplexity,
    episode_split,
    gap_closed,
    gap_two_se,
    majority_rate,
    probe_accuracy,
    probe_halves,
    probe_report,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _episodes(n: int, length: int) -> np.ndarray:
    return np.repeat(np.arange(n), length)


def _noisy_onehot(actions: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """The true action's one-hot with probability p, else a uniformly random action's one-hot,
    plus a little Gaussian noise. The Bayes-optimal guess is the shown action, right with
    probability p + (1 - p) / 15 (for uniform actions)."""
    shown = np.where(rng.random(len(actions)) < p, actions, rng.integers(0, NUM_ACTIONS, len(actions)))
    return np.eye(NUM_ACTIONS, dtype=np.float32)[shown] + 0.1 * rng.standard_normal((len(actions), NUM_ACTIONS))


FAST = ProbeConfig(max_epochs=60, patience=5, batch_size=256)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
def test_probe_reaches_the_bayes_rate(p: float):
    rng = np.random.default_rng(0)
    ids = _episodes(250, 40)  # 10,000 triplets
    actions = rng.integers(0, NUM_ACTIONS, len(ids))
    latents = _noisy_onehot(actions, p, rng)
    test = probe_halves(ids)
    r = probe_accuracy(latents, actions, test, FAST, episode_ids=ids)
    bayes = p + (1 - p) / NUM_ACTIONS
    # ~5,000 test triplets: one standard error of an accuracy near 0.5 is 0.007.
    assert abs(r["probe_acc"] - bayes) < 0.03, (r["probe_acc"], bayes)
    assert r["n_train"] + r["n_val"] + r["n_test"] == len(ids)
    assert 0.15 < r["n_val"] / (r["n_train"] + r["n_val"]) < 0.25


def test_probe_on_noise_falls_back_to_the_majority_action():
    # Latents independent of skewed actions: the best a probe can do is the majority action.
    rng = np.random.default_rng(1)
    ids = _episodes(200, 40)
    actions = np.where(rng.random(len(ids)) < 0.4, 3, rng.integers(0, NUM_ACTIONS, len(ids)))
    latents = rng.standard_normal((len(ids), 16)).astype(np.float32)
    test = probe_halves(ids)
    majority = majority_rate(actions, test)
    assert abs(majority - (0.4 + 0.6 / 15)) < 0.02
    r = probe_accuracy(latents, actions, test, FAST, episode_ids=ids)
    assert abs(r["probe_acc"] - majority) < 0.02, (r["probe_acc"], majority)
    assert abs(r["probe_info_bits"]) < 0.05  # noise tells nothing about the action


def test_probe_information_sees_what_accuracy_cannot_on_a_dominant_action():
    # 76% of the actions are one action (a trained CoinRun agent's corpus); the latent flags
    # half of the other actions as "not the usual one" without saying which. No answer but the
    # majority can win, so accuracy stays at the majority rate, yet the latent is informative.
    rng = np.random.default_rng(5)
    ids = _episodes(250, 40)
    rare = rng.random(len(ids)) > 0.76
    actions = np.where(rare, rng.integers(4, NUM_ACTIONS, len(ids)), 3)
    flag = rare & (rng.random(len(ids)) < 0.5)
    latents = np.stack([flag.astype(np.float32), rng.standard_normal(len(ids)).astype(np.float32)], 1)
    test = probe_halves(ids)
    r = probe_accuracy(latents, actions, test, FAST, episode_ids=ids)
    assert abs(r["probe_acc"] - majority_rate(actions, test)) < 0.02
    # I(flag; action) = H(flag) - H(flag | action) = h(0.12) - 0.24 h(0.5) = 0.529 - 0.24 = 0.29 bits.
    assert 0.2 < r["probe_info_bits"] < 0.32, r["probe_info_bits"]


def test_early_stopping_reports_the_best_validation_epoch():
    # Few triplets, many noise dimensions and a weak signal: the probe overfits after a few
    # epochs, so validation accuracy peaks early and the last epoch is not the best one.
    rng = np.random.default_rng(2)
    ids = _episodes(40, 25)
    actions = rng.integers(0, NUM_ACTIONS, len(ids))
    latents = np.concatenate([_noisy_onehot(actions, 0.5, rng), 3 * rng.standard_normal((len(ids), 200))], 1)
    cfg = dataclasses.replace(FAST, max_epochs=100, patience=8, batch_size=32)
    r = probe_accuracy(latents, actions, probe_halves(ids), cfg, episode_ids=ids)
    val, test = r["history"]["val_acc"], r["history"]["test_acc"]
    best = r["best_epoch"]
    assert val[best] == max(val) and r["probe_val_acc"] == max(val)
    assert r["probe_acc"] == pytest.approx(test[best], abs=1e-7)  # the best epoch's weights, restored
    assert r["epochs_run"] == best + 1 + cfg.patience < cfg.max_epochs  # stopped, not run out
    assert r["probe_train_acc"] > r["probe_acc"] + 0.2  # it did overfit: early stopping mattered


def test_splits_keep_episodes_whole():
    rng = np.random.default_rng(3)
    ids = np.repeat(np.arange(60), rng.integers(5, 80, 60))
    for frac in (0.2, 0.5):
        mask = episode_split(ids, frac)
        assert not set(ids[mask]) & set(ids[~mask])
        assert abs(mask.mean() - frac) < 0.05
    single = episode_split(np.zeros(100, int), 0.2)
    assert single.sum() == 20 and single[-20:].all()  # one long video: its last fifth


def test_majority_rate_counts():
    actions = np.array([1, 1, 2, 0, 1, 2, 2, 2])
    test = np.array([False, False, False, False, True, True, True, True])
    assert majority_rate(actions, test) == 0.25  # train majority is 1; one test triplet has it


def test_nmi_is_one_for_a_code_that_determines_the_action_and_zero_for_noise():
    rng = np.random.default_rng(4)
    n = 20_000
    actions = rng.integers(0, NUM_ACTIONS, n)
    # Two codes per action (and a free second slot): the code determines the action, not back.
    codes = np.stack([2 * actions + rng.integers(0, 2, n), rng.integers(0, 2, n)], 1)[:, None, :]
    det = code_action_nmi(codes, actions)
    assert det["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert det["mi_bits"] == pytest.approx(det["action_entropy_bits"], abs=1e-9)
    assert det["distinct_codes"] == 60

    noise = code_action_nmi(rng.integers(0, 16, (n, 1, 2)), actions)
    assert abs(noise["nmi"]) < 0.01
    # The plug-in estimate is biased upwards by ~(256 - 1)(15 - 1) / (2 n ln 2) = 0.13 bits.
    assert 0.1 < noise["mi_bits"] < 0.16 and noise["nmi_plugin"] > 0.025


def test_nmi_matches_the_analytic_value_for_a_noisy_code():
    # code = action with probability p, else a uniform random action: the posterior of the
    # action given the code puts q = p + (1 - p) / 15 on the code and (1 - p) / 15 elsewhere.
    rng = np.random.default_rng(5)
    n, p = 40_000, 0.6
    actions = rng.integers(0, NUM_ACTIONS, n)
    codes = np.where(rng.random(n) < p, actions, rng.integers(0, NUM_ACTIONS, n))[:, None, None]
    q, r = p + (1 - p) / NUM_ACTIONS, (1 - p) / NUM_ACTIONS
    h_a = math.log2(NUM_ACTIONS)
    expected = (h_a + q * math.log2(q) + (NUM_ACTIONS - 1) * r * math.log2(r)) / h_a
    assert code_action_nmi(codes, actions)["nmi"] == pytest.approx(expected, abs=0.01)


def test_perplexity_counts_used_codes_not_information():
    rng = np.random.default_rng(6)
    uniform = rng.integers(0, 16, (20_000, 2, 2))
    collapsed = np.zeros((100, 2, 2), int)
    assert codebook_perplexity(uniform) == pytest.approx([16.0, 16.0], rel=0.01)
    assert codebook_perplexity(collapsed) == [1.0, 1.0]
    # Full perplexity with no information about the action at all (one latent per codebook:
    # 256 code tuples, so the chance correction has room to work with 20k triplets).
    assert abs(code_action_nmi(uniform[:, :, :1], rng.integers(0, NUM_ACTIONS, 20_000))["nmi"]) < 0.01


def test_probe_report_carries_every_reference():
    def acc(a: float) -> dict:
        return {"probe_acc": a, "best_epoch": 3, "epochs_run": 14, "n_train": 8, "n_val": 2, "n_test": 10}

    codes = {"trained": {"nmi": {"nmi": 0.3}, "perplexity": [12.0, 11.0]},
             "untrained": {"nmi": {"nmi": 0.01}, "perplexity": [1.5, 1.2]}}
    r = probe_report(acc(0.4), acc(0.2), acc(0.6), 0.15, direct_classifier=0.65, codes=codes)
    assert r["gap_closed"] == pytest.approx(0.5)
    assert (r["probe_acc"], r["floor_untrained_idm"], r["ceiling_supervised_idm"], r["majority_rate"],
            r["direct_supervised_classifier"]) == (0.4, 0.2, 0.6, 0.15, 0.65)
    assert (r["nmi_trained"], r["nmi_untrained"]) == (0.3, 0.01)
    assert r["perplexity_trained"] == [12.0, 11.0] and r["probe_best_epoch"] == 3
    assert gap_closed(0.3, 0.2, 0.2) is None
    # The experiment's CoinRun corpus: floor 0.7573, ceiling 0.7590 on 2,349 test triplets. Two
    # standard errors of the difference are 2 sqrt(2 x 0.757 x 0.243 / 2349) = 0.025: no gap.
    assert gap_two_se(0.7573, 2349) == pytest.approx(0.0250, abs=2e-4)
    assert gap_closed(0.7586, 0.7573, 0.7590, n_test=2349) is None
    assert gap_closed(0.7586, 0.7573, 0.7590) == pytest.approx(0.76, abs=0.01)  # what it read before


def test_plots_go_straight_to_any_storage_uri(tmp_path):
    """One save_figure for every plot: a PNG lands at a local path or a remote URI, no temp file."""
    import uuid

    from lapo_ray import storage
    from lapo_ray.evaluation.plots import plot_latent_map, plot_return_curves

    rng = np.random.default_rng(0)
    uri = f"memory://plots-{uuid.uuid4().hex[:8]}/latent_map.png"
    plot_latent_map(rng.standard_normal((200, 8)), rng.integers(0, 15, 200), uri, title="t")
    assert storage.read_bytes(uri)[:8] == b"\x89PNG\r\n\x1a\n"
    path = tmp_path / "plots" / "return.png"
    plot_return_curves({"rl+sl": [{"env_steps": i * 100, "episode_return_norm": i / 10} for i in range(5)]}, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG" and len(path.read_bytes()) > 1000
