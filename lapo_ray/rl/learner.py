"""PPO Learner of the LAPO agent: one optimiser per part with its own schedule, reward scaling,
and the decoder's online supervision from the IDM's latents (the paper's "RL + SL").

Settings arrive through ``learner_config_dict`` (see :func:`lapo_ray.rl.algo.build_algorithm_config`):
``lapo_parts`` ({part: lr schedule}), ``lapo_idm_checkpoint`` (stage-1 checkpoint URI, or None for
"RL, no SL" and from scratch), ``lapo_sl_coeff``, ``lapo_normalize_rewards``, ``lapo_reward_clip``,
``lapo_decoder_rl_grad``, ``lapo_decoder_buffer``, ``lapo_decoder_sl_batch``.

The decoder, by default, learns as in the paper: by supervision only. The module detaches the
decoded logits from PPO's loss; the IDM labels every collected transition, the (latent, action
taken) pairs go into a buffer of recent pairs, and at every PPO minibatch step the decoder takes
one cross-entropy step on up to ``lapo_decoder_sl_batch`` pairs from it, so each iteration refits
it for several passes over the stored pairs. With ``lapo_decoder_rl_grad`` the decoder also takes
PPO's gradient and its cross-entropy is on the minibatch's own labelled steps (the earlier agent).
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


class LapoPPOLearner(PPOTorchLearner):
    def build(self) -> None:
        super().build()  # PPO prepends its phantom-step piece and appends GAE
        opts = self.config.learner_config_dict
        self._sl = opts.get("lapo_idm_checkpoint") is not None
        self._decoder_rl_grad = bool(opts.get("lapo_decoder_rl_grad", False))
        self._pairs: PairBuffer | None = None
        pipeline = self._learner_connector
        if pipeline is None or not self.config.add_default_connectors_to_learner_pipeline:
            return
        if opts.get("lapo_normalize_rewards", True):
            gamma = self.config.gamma
            pipeline.prepend(NormalizeRewards(gamma=gamma, clip=opts.get("lapo_reward_clip", 10.0)))
            pipeline.insert_before(GeneralAdvantageEstimation,
                                   ScaleRewardsInBatch(clip=opts.get("lapo_reward_clip", 10.0)))
        if self._sl:
            from lapo_ray.train.checkpoint import load_dynamics  # torch-only; keeps RL imports light

            idm = load_dynamics(opts["lapo_idm_checkpoint"])
            if not self._decoder_rl_grad:
                self._pairs = PairBuffer(opts.get("lapo_decoder_buffer", 16_384), idm.cfg.latent_dim,
                                         seed=self.config.seed or 0)
            pipeline.prepend(LabelTripletsWithIDM(idm=idm, pairs=self._pairs))
            pipeline.insert_after(AddObservationsFromEpisodesToBatch, AddIDMLatentsToBatch())

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id].unwrapped()
        schedules = config.learner_config_dict["lapo_parts"]
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
        if self._decoder_rl_grad:
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
            sl_batch = config.learner_config_dict.get("lapo_decoder_sl_batch", 4096)
            z, a = (t.to(device) for t in self._pairs.sample(sl_batch))
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
        return total + self.config.learner_config_dict.get("lapo_sl_coeff", 1.0) * sl_loss
