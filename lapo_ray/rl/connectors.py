"""Learner connector pieces of the LAPO agent.

``LabelTripletsWithIDM`` and ``AddIDMLatentsToBatch`` give the decoder its online supervision
(the paper's "RL + SL"): the frozen stage-1 IDM labels every collected transition
(o[t-1], o[t], o[t+1]) with its latent action, and the Learner's loss trains the decoder to map
that latent to the action the agent actually took at o[t]. They are two pieces because PPO's
``AddOneTsToEpisodesAndTruncate`` rewrites the episodes (one phantom step, ids, truncation flags):
the labels must be computed from the episodes as sampled, but added to the batch in the layout
the rest of the pipeline builds. ``shared_data`` carries them from the first piece to the second.

``NormalizeRewards`` is PPO's usual reward scaling (gym's ``NormalizeReward`` plus clipping, as in
the paper's PPO) done in the Learner, so the env runners keep reporting raw returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override

LATENT = "lapo_idm_latent"
LATENT_MASK = "lapo_idm_latent_mask"
_SHARED_KEY = "lapo_idm_labels"


class PairBuffer:
    """The most recent (IDM latent, action taken) pairs, a ring of ``capacity``: what the decoder
    is refit on by supervision (the paper's stage 3 keeps the pairs it collects)."""

    def __init__(self, capacity: int, latent_dim: int, seed: int = 0):
        self.latents = torch.zeros(capacity, latent_dim)
        self.actions = torch.zeros(capacity, dtype=torch.int64)
        self.capacity, self.size, self._next = capacity, 0, 0
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, latents: np.ndarray, actions: np.ndarray) -> None:
        latents, actions = torch.as_tensor(latents[-self.capacity:]), torch.as_tensor(actions[-self.capacity:])
        idx = (self._next + torch.arange(len(actions))) % self.capacity
        self.latents[idx], self.actions[idx] = latents.float(), actions.long()
        self._next = (self._next + len(actions)) % self.capacity
        self.size = min(self.capacity, self.size + len(actions))

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All pairs when there are at most ``n``, else ``n`` drawn without replacement."""
        if self.size <= n:
            return self.latents[: self.size], self.actions[: self.size]
        idx = torch.randperm(self.size, generator=self._gen)[:n]
        return self.latents[idx], self.actions[idx]


class LabelTripletsWithIDM(ConnectorV2):
    """First piece of the learner pipeline: IDM latents of every step of every sampled episode.

    With the IDM's frame offset d, a step t gets a label when o[t-d] and o[t+d] are both in the
    sampled chunk: o[t-d] may come from the lookback buffer of a chunk that continues an earlier
    one; an episode that ended has no real observation after its last step (the env's final
    observation is a stand-in, see ``lapo_ray.envs.procgen``), so its last d steps stay
    unlabelled, as do the last d - 1 steps of a chunk that goes on.
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *, idm=None,
                 batch_size: int = 512, pairs: PairBuffer | None = None, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.idm = idm  # a LatentDynamics in eval mode; only its encoder runs here
        self.batch_size = batch_size
        self.pairs = pairs  # labelled steps also go here, with the action taken

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs) -> Any:
        labels = shared_data.setdefault(_SHARED_KEY, {})
        for ep in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            n, d = len(ep), self.idm.cfg.frame_offset
            lookback = min(d, ep.observations.lookback)
            obs = np.asarray(ep.get_observations(slice(-lookback, n + 1), neg_index_as_lookback=True))
            t = np.arange(n)
            # obs[i + lookback] is o[i] for i in [-lookback, n]; o[n] is a stand-in if the episode ended.
            valid = (t + lookback >= d) & (t + d <= n - int(ep.is_done))
            latents = np.zeros((n, self.idm.cfg.latent_dim), np.float32)
            idx = np.nonzero(valid)[0]
            for s in range(0, len(idx), self.batch_size):
                rows = idx[s:s + self.batch_size] + lookback
                triplets = np.stack([obs[rows - d], obs[rows], obs[rows + d]], axis=1)
                with torch.no_grad():
                    z, _ = self.idm.encode(torch.from_numpy(triplets))
                latents[idx[s:s + self.batch_size]] = z.float().numpy()
            labels[id(ep)] = (latents, valid)
            if self.pairs is not None and valid.any():
                self.pairs.add(latents[valid], np.asarray(ep.get_actions(), np.int64)[valid])
        return batch


class AddIDMLatentsToBatch(ConnectorV2):
    """Adds the labels of ``LabelTripletsWithIDM`` as batch columns ``LATENT`` and ``LATENT_MASK``
    (False on PPO's phantom step)."""

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs) -> Any:
        labels = shared_data.get(_SHARED_KEY, {})
        for ep in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            latents, valid = labels[id(ep)]
            n = len(ep)  # the sampled length plus PPO's phantom step
            pad = n - len(valid)
            latents = np.concatenate([latents, np.zeros((pad, latents.shape[1]), np.float32)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
            self.add_n_batch_items(batch, LATENT, list(latents), n, ep)
            self.add_n_batch_items(batch, LATENT_MASK, list(valid), n, ep)
        return batch


class NormalizeRewards(ConnectorV2):
    """Divide rewards by the running standard deviation of the discounted return, then clip.

    The running return of each episode is carried across the chunks the env runners send (keyed
    by the episode id before PPO's piece appends its suffix), so long episodes are scaled as one.
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *, gamma: float = 0.999,
                 clip: float = 10.0, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.gamma, self.clip = gamma, clip
        self.count, self.mean, self.var = 1e-4, 0.0, 1.0
        self._returns: dict[str, float] = {}

    def _update(self, x: np.ndarray) -> None:
        # Chan et al.'s parallel variance update, as in gym's RunningMeanStd.
        b_mean, b_var, b_count = x.mean(), x.var(), len(x)
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean += delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var, self.count = m2 / total, total

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs) -> Any:
        for ep in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            rewards = np.asarray(ep.get_rewards(), np.float64)
            ret = self._returns.pop(ep.id_, 0.0)
            returns = np.empty(len(rewards))
            for i, r in enumerate(rewards):
                ret = self.gamma * ret + r
                returns[i] = ret
            if len(returns):
                self._update(returns)
            if not ep.is_done:
                self._returns[ep.id_] = ret
        shared_data["lapo_reward_scale"] = float(np.sqrt(self.var + 1e-8))
        return batch

    @override(ConnectorV2)
    def get_state(self, *args, **kwargs) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    @override(ConnectorV2)
    def set_state(self, state: dict[str, Any]) -> None:
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]


class ScaleRewardsInBatch(ConnectorV2):
    """Applies the scale ``NormalizeRewards`` measured to the batch's rewards (before GAE)."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, clip: float = 10.0, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.clip = clip

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs) -> Any:
        scale = shared_data.get("lapo_reward_scale")
        if scale is None:
            return batch
        for module_batch in batch.values():
            r = module_batch[Columns.REWARDS]
            module_batch[Columns.REWARDS] = (r / scale).clamp(-self.clip, self.clip) if torch.is_tensor(r) \
                else np.clip(np.asarray(r) / scale, -self.clip, self.clip)
        return batch
