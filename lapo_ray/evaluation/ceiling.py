"""The probe's ceiling: the IDM architecture trained directly on the true actions.

Same encoder as the latent IDM (IMPALA CNN over the three stacked frames), a linear head to the
15 actions instead of the VQ latent, the same training triplets, batch size, step count and
learning-rate schedule as stage 1. Its accuracy on the probe's test half is what an IDM of this
size could reach if it had the labels.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lapo_ray.config import ModelConfig, PipelineConfig, StageConfig
from lapo_ray.data.triplets import torch_batches
from lapo_ray.models import ImpalaCNN, frames_to_input, stack_frames
from lapo_ray.progress import Progress

NUM_ACTIONS = 15


class SupervisedIDM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, s, i = cfg.channels, cfg.frame_size, cfg.idm
        self.encoder = ImpalaCNN(3 * c, s, i.impala_scale, i.impala_channels, i.impala_features)
        self.head = nn.Linear(i.impala_features, NUM_ACTIONS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 (B, 3, H, W, C) -> action logits (B, 15)."""
        return self.head(self.encoder(stack_frames(frames_to_input(frames))))


def train_ceiling(train_ds, model_cfg: ModelConfig, stage: StageConfig, pipe: PipelineConfig,
                  steps: int, seed: int = 0) -> SupervisedIDM:
    """Train on labelled triplets (``action`` >= 0) of ``train_ds`` for ``steps`` steps."""
    from lapo_ray.train.loop import lr_factor, use_bf16

    torch.manual_seed(seed)
    model = SupervisedIDM(model_cfg).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    progress = Progress(steps, "ceiling (supervised IDM)", unit="steps", interval=15)
    step, epoch = 0, 0
    while step < steps:
        n = 0
        shape = (model_cfg.frame_size, model_cfg.frame_size, model_cfg.channels)
        for batch in torch_batches(train_ds, shape, stage.batch_size, pipe, drop_last=True, epoch=epoch):
            labelled = batch["action"] >= 0
            if labelled.sum() == 0:
                continue
            for g in opt.param_groups:
                g["lr"] = stage.lr * lr_factor(step, stage)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(stage, torch.device("cpu"))):
                logits = model(batch["frames"][labelled])
            loss = F.cross_entropy(logits.float(), batch["action"][labelled])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
            opt.step()
            step += 1
            n += 1
            progress.update(1, extra=f"loss {loss.item():.3f}")
            if step >= steps:
                break
        if n == 0:
            raise RuntimeError("no labelled training batch for the ceiling IDM")
        epoch += 1
    return model.eval()


@torch.no_grad()
def ceiling_accuracy(model: SupervisedIDM, frames: np.ndarray, actions: np.ndarray,
                     test_mask: np.ndarray, batch_size: int = 256) -> float:
    idx = np.flatnonzero(test_mask)
    correct = 0
    for i in range(0, len(idx), batch_size):
        j = idx[i : i + batch_size]
        pred = model(torch.from_numpy(frames[j])).argmax(-1).numpy()
        correct += int((pred == actions[j]).sum())
    return correct / max(1, len(idx))
