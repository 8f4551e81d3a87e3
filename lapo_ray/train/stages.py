"""What stages 1 and 2 train: the ``StageTask``s that ``loop.run_stage`` runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lapo_ray.config import ModelConfig, Stage1Config
from lapo_ray.envs import NUM_ACTIONS
from lapo_ray.models import LatentDynamics, LatentPolicy, SupervisedIDM, action_loss
from lapo_ray.models.impala import frames_to_input
from lapo_ray.train.recipes import change_weights, random_shift


def _triplet_batches(model_cfg: ModelConfig, ds, batch_size, pipe, drop_last, epoch, device):
    """A task's ``batches`` over triplets, cut at the model's frame offset: streamed from a
    dataset, or by index from a corpus held on the device (``_hold_triplets``)."""
    # lazy: the input pipeline needs pyarrow; the models and the step run on machines with PyTorch alone
    from lapo_ray.data.resident import ResidentTriplets
    from lapo_ray.data.triplets import torch_batches

    if isinstance(ds, ResidentTriplets):
        return ds.batches(batch_size, seed=pipe.shuffle_seed + epoch, drop_last=drop_last)
    return torch_batches(ds, _frame_shape(model_cfg), batch_size, pipe, drop_last, epoch, device=device,
                         offset=model_cfg.frame_offset)


def _hold_triplets(model_cfg: ModelConfig, name: str, shard, pipe, device):
    """A task's ``hold_on_device``: its shard read once and held on ``device`` (--data.device-resident)."""
    from lapo_ray.data.resident import hold_dataset  # lazy, as in _triplet_batches

    return hold_dataset(shard, _frame_shape(model_cfg), device or torch.device("cpu"), pipe,
                        offset=model_cfg.frame_offset, name=name)


def _frame_shape(model_cfg: ModelConfig) -> tuple[int, int, int]:
    return (model_cfg.frame_size, model_cfg.frame_size, model_cfg.channels)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# A measurement stage 1 reports as it trains, given the IDM's encoder (frames -> latents):
# ``evaluation.probe.TrainingProbe``, built by the caller, since train imports no evaluation.
TrainingMetric = Callable[[Callable[[torch.Tensor], torch.Tensor]], dict[str, float]]


@dataclass
class ActionLabelSet:
    """The action-labelled training triplets of --stage1.action-labels, held in memory (256
    triplets of 64x64 frames are 9 MB), so every step can draw an action-labelled mini-batch of its
    own, as LAOM does. Which triplets carry their action label is fixed by
    ``recipes.triplet_hash_np``."""

    frames: np.ndarray  # uint8 (N, 3, H, W, C)
    actions: np.ndarray  # int64 (N,)
    seed: int = 0  # the draws' generator: this seed and the data-parallel rank

    def __post_init__(self):
        if len(self.frames) != len(self.actions) or len(self.actions) == 0:
            raise ValueError(f"ActionLabelSet: {len(self.frames)} triplets and {len(self.actions)} actions; "
                             "need the same positive number")
        self._on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._gen: torch.Generator | None = None

    def draw(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` triplets drawn with replacement, copied to ``device`` once and kept there. The
        draws come from a generator of this set's own, seeded by ``seed`` and the data-parallel
        rank: the training loop seeds torch alike on every rank (same initial weights), which
        would give every rank the same labelled batch."""
        key = str(device)
        if key not in self._on:
            # A copy: the arrays arrive read-only from the object store, and torch wants writable memory.
            self._on[key] = (torch.tensor(self.frames, device=device), torch.tensor(self.actions, device=device))
        if self._gen is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self._gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, rank]).generate_state(1)[0]))
        frames, actions = self._on[key]
        # Indices on the host (a host-to-device copy, never a sync), so one generator serves any device.
        idx = torch.randint(len(actions), (n,), generator=self._gen).to(device, non_blocking=True)
        return frames[idx], actions[idx]

    def __getstate__(self):  # the device copies and the generator stay behind when the task travels
        return {"frames": self.frames, "actions": self.actions, "seed": self.seed}

    def __setstate__(self, state):
        self.frames, self.actions, self.seed = state["frames"], state["actions"], state["seed"]
        self._on, self._gen = {}, None


@dataclass
class Stage1Task:
    """IDM + world model: reconstruct o[t+1] through the VQ latent action."""

    model_cfg: ModelConfig
    probe: TrainingMetric | None = None
    name: str = "stage1"
    # The recipe options (Stage1Config.action_labels, change_weight, augment; docs/recipes.md).
    # None: the plain LAPO objective.
    recipe: Stage1Config | None = None
    # The action-labelled training triplets (--stage1.action-labels), loaded by the caller.
    action_label_set: ActionLabelSet | None = None

    def build(self) -> torch.nn.Module:
        return LatentDynamics(self.model_cfg, num_actions=NUM_ACTIONS if self._uses_action_labels() else 0)

    def _uses_action_labels(self) -> bool:
        return self.recipe is not None and self.recipe.action_labels > 0

    def batches(self, ds, batch_size, pipe, drop_last, epoch, device=None):
        return _triplet_batches(self.model_cfg, ds, batch_size, pipe, drop_last, epoch, device)

    def hold_on_device(self, shard, pipe, device=None):
        return _hold_triplets(self.model_cfg, self.name, shard, pipe, device)

    def loss(self, model, batch):
        recipe = self.recipe
        frames = batch["frames"]
        if recipe is not None and recipe.augment == "shift":
            frames = random_shift(frames, recipe.shift_pad)
        out = model(frames)
        loss = out["loss"]
        metrics = {"wm_loss": out["wm_loss"], "vq_loss": out["vq_loss"]}
        if recipe is not None and recipe.change_weight > 0:
            x = frames_to_input(frames)
            target = x[:, 2].contiguous(memory_format=torch.channels_last)
            weights = change_weights(x, recipe.change_weight, recipe.change_baseline)
            weighted = (weights * (out["pred"].float() - target) ** 2).mean()
            loss = weighted + out["vq_loss"]
            metrics["wm_loss_weighted"] = weighted
        if self._uses_action_labels():
            if self.action_label_set is None:
                raise ValueError("stage 1: --stage1.action-labels is set but the task has no labelled triplets")
            drawn_frames, drawn_actions = self.action_label_set.draw(recipe.action_label_batch, frames.device)
            if recipe.augment == "shift":
                drawn_frames = random_shift(drawn_frames, recipe.shift_pad)
            logits = _unwrap(model).action_logits(drawn_frames)
            action_label_loss = F.cross_entropy(logits, drawn_actions)
            loss = loss + recipe.action_label_weight * action_label_loss
            metrics.update(label_loss=action_label_loss, label_acc=(logits.argmax(-1) == drawn_actions).float().mean())
        metrics["loss"] = loss
        for i in range(self.model_cfg.vq.num_codebooks):
            metrics[f"vq_perplexity_cb{i}"] = out["perplexity"][i]
            metrics[f"vq_usage_cb{i}"] = out["usage"][i]
        return loss, metrics

    def validate(self, model, batches):
        losses = torch.stack([model(b["frames"])["wm_loss"].float() for b in batches]).tolist()
        return {"wm_loss": float(np.mean(losses))}

    def extra_metrics(self, model) -> dict[str, float]:
        if self.probe is None:
            return {}
        dyn = _unwrap(model)
        with torch.autocast("cpu", enabled=False):
            return self.probe(lambda f: dyn.encode(f)[0])


@dataclass
class Stage2Task:
    """Latent behaviour cloning: predict the IDM's continuous latent action from o[t]."""

    model_cfg: ModelConfig
    name: str = "stage2"

    def build(self) -> torch.nn.Module:
        model_cfg = self.model_cfg
        return LatentPolicy(model_cfg.policy, model_cfg.latent_dim, model_cfg.channels, model_cfg.frame_size)

    def batches(self, ds, batch_size, pipe, drop_last, epoch, device=None):
        buffer = pipe.local_shuffle_buffer or None
        device = torch.device("cpu") if device is None else device
        # Ray Data copies each batch to the device in its prefetch thread, from pinned memory on GPUs.
        return ds.iter_torch_batches(batch_size=batch_size, drop_last=drop_last, local_shuffle_buffer_size=buffer,
                                     local_shuffle_seed=pipe.shuffle_seed + epoch if buffer else None,
                                     device=device, pin_memory=device.type == "cuda",
                                     prefetch_batches=pipe.prefetch_blocks)

    def loss(self, model, batch):
        loss = F.mse_loss(model(batch["obs"]).float(), batch["latent"].float())
        return loss, {"loss": loss}

    def validate(self, model, batches):
        losses = torch.stack([F.mse_loss(model(b["obs"]).float(), b["latent"].float()) for b in batches]).tolist()
        return {"loss": float(np.mean(losses))}

    def extra_metrics(self, model) -> dict[str, float]:
        return {}


@dataclass
class SupervisedIDMTask:
    """The supervised IDM as a ``StageTask``: cross-entropy on the labelled triplets."""

    model_cfg: ModelConfig
    name: str = "ceiling"

    def build(self) -> torch.nn.Module:
        return SupervisedIDM(self.model_cfg, NUM_ACTIONS)

    def batches(self, ds, batch_size, pipe, drop_last, epoch, device=None):
        return _triplet_batches(self.model_cfg, ds, batch_size, pipe, drop_last, epoch, device)

    def hold_on_device(self, shard, pipe, device=None):
        return _hold_triplets(self.model_cfg, self.name, shard, pipe, device)

    def loss(self, model, batch):
        loss, correct, n = action_loss(model(batch["frames"]), batch["action"])
        return loss, {"loss": loss, "acc": correct / n.clamp(min=1), "labelled_frac": n / len(batch["action"])}

    def validate(self, model, batches):
        correct = total = 0
        for b in batches:
            _, hits, n = action_loss(model(b["frames"]), b["action"])
            correct, total = correct + int(hits), total + int(n)
        return {"acc": correct / max(total, 1)}

    def extra_metrics(self, model) -> dict[str, float]:
        return {}
