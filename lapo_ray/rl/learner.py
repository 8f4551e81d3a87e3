"""PPO Learner of the LAPO agent: one optimiser per part with its own schedule, reward scaling,
and the decoder's online supervision from the IDM's latents (the paper's "RL + SL").

Its settings are one :class:`lapo_ray.config.rl.LearnerSettings` under ``learner_config_dict[SETTINGS_KEY]``
(put there by :func:`lapo_ray.rl.algo.build_algorithm_config`): ``parts`` ({part: lr schedule}),
``idm_checkpoint`` (stage-1 checkpoint URI, or None for "RL, no SL" and from scratch), ``sl_coeff``,
``normalize_rewards``, ``reward_clip``, ``decoder_rl_grad``, ``decoder_buffer``, ``decoder_sl_batch``.

The decoder, by default, learns as in the paper: by supervision only. The module detaches the
decoded logits from PPO's loss; the IDM labels every collected transition, the (latent, action
taken) pairs go into a buffer of recent pairs, and at every PPO minibatch step the decoder takes
one cross-entropy step on up to ``decoder_sl_batch`` pairs from it, so each iteration refits it
for several passes over the stored pairs. With ``decoder_rl_grad`` the decoder also takes PPO's
gradient and its cross-entropy is on the minibatch's own labelled steps (the joint update).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.common.add_observations_from_episodes_to_batch import (
    AddObservationsFromEpisodesToBatch,
)
from ray.rllib.connectors.learner import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

from lapo_ray.config.rl import LearnerSettings
from lapo_ray.rl.connectors import (
    LATENT,
    LATENT_MASK,
    AddIDMLatentsToBatch,
    LabelTripletsWithIDM,
    NormalizeRewards,
    PairBuffer,
    ScaleRewardsInBatch,
)
from lapo_ray.rl.module import PARTS
from lapo_ray.train.checkpoint import load_dynamics


# The one key of ``learner_config_dict`` this Learner owns; RLlib shares that dict with any other
# custom piece, so the settings sit under a name of their own rather than as loose keys.
SETTINGS_KEY = "lapo"


def learner_settings(config) -> LearnerSettings:
    """The agent's settings inside an RLlib ``AlgorithmConfig``."""
    return config.learner_config_dict[SETTINGS_KEY]


class LapoPPOLearner(PPOTorchLearner):
    @override(PPOTorchLearner)
    def build(self) -> None:
        self._settings = settings = learner_settings(self.config)
        super().build()  # PPO prepends its phantom-step piece and appends GAE
        self._sl = settings.idm_checkpoint is not None
        self._pairs: PairBuffer | None = None
        pipeline = self._learner_connector
        if pipeline is None or not self.config.add_default_connectors_to_learner_pipeline:
            return
        if settings.normalize_rewards:
            pipeline.prepend(NormalizeRewards(gamma=self.config.gamma, clip=settings.reward_clip))
            pipeline.insert_before(GeneralAdvantageEstimation, ScaleRewardsInBatch(clip=settings.reward_clip))
        if self._sl:
            idm = load_dynamics(settings.idm_checkpoint)
            if not settings.decoder_rl_grad:
                self._pairs = PairBuffer(settings.decoder_buffer, idm.cfg.latent_dim, seed=self.config.seed or 0)
            pipeline.prepend(LabelTripletsWithIDM(idm=idm, pairs=self._pairs))
            pipeline.insert_after(AddObservationsFromEpisodesToBatch, AddIDMLatentsToBatch())

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id].unwrapped()
        schedules = learner_settings(config).parts
        for part in PARTS:
            params = module.part_parameters(part)
            if not params:
                continue
            schedule = schedules[part]
            if schedule == 0.0:  # frozen for the whole run: no optimiser state, no gradients
                for p in params:
                    p.requires_grad_(False)
                continue
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=part,
                optimizer=torch.optim.Adam(params, eps=1e-5),
                params=params,
                lr_or_lr_schedule=schedule,
            )

    @override(PPOTorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out) -> torch.Tensor:
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        if not self._sl:
            return total
        module = self.module[module_id].unwrapped()
        mask = batch[LATENT_MASK].bool() if LATENT in batch else None
        if mask is not None and Columns.LOSS_MASK in batch:
            mask = mask & batch[Columns.LOSS_MASK].bool()
        has_batch_labels = mask is not None and bool(mask.any())
        metrics = {}
        if self._settings.decoder_rl_grad:
            if not has_batch_labels:
                return total
            logits = module.decoded_logits(batch[LATENT][mask])
            actions = batch[Columns.ACTIONS][mask].long()
            sl_loss = F.cross_entropy(logits, actions, label_smoothing=0.05)
            metrics["decoder_accuracy"] = (logits.argmax(-1) == actions).float().mean()
        else:
            if self._pairs is None or len(self._pairs) == 0:
                return total
            device = next(module.decoder.parameters()).device
            z, a = (t.to(device) for t in self._pairs.sample(self._settings.decoder_sl_batch))
            sl_loss = F.cross_entropy(module.decoded_logits(z), a, label_smoothing=0.05)
            metrics["decoder_buffer_pairs"] = float(len(self._pairs))
            if has_batch_labels:  # agreement with the actions of this minibatch, which it also trains on
                with torch.no_grad():
                    logits = module.decoded_logits(batch[LATENT][mask])
                metrics["decoder_accuracy"] = (logits.argmax(-1) == batch[Columns.ACTIONS][mask].long()).float().mean()
        metrics["decoder_sl_loss"] = sl_loss
        if mask is not None:
            metrics["decoder_labelled_frac"] = mask.float().mean()
        self.metrics.log_dict(metrics, key=module_id, window=1)
        return total + self._settings.sl_coeff * sl_loss
