"""One optimisation step of stages 1 and 2, in plain PyTorch.

This is the step that every Ray Train worker runs (``loop.run_stage``) and that
``jobs/benchmark.py step`` times on its own. It imports nothing of Ray, pyarrow or wandb,
so a machine with PyTorch alone can run and measure it.

No host sync inside a step: the loss and the metrics stay on the device and are summed there
(``MetricSums``); the host reads them back once per report. A ``.item()`` per step makes the host
wait for the GPU to finish the step before it may queue the next one, so the GPU idles while the
host prepares each step (measured: docs/results/choices.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lapo_ray.config import StageConfig
from lapo_ray.models.vq import keep_dead_code_split_eager


def use_bf16(cfg: StageConfig, device: torch.device) -> bool:
    """Whether to autocast to bf16. On a CPU without native bf16 (e.g. AVX2 only) autocast
    emulates it and a stage-1 step gets several times slower, so "auto" keeps fp32 there."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def lr_factor(step: int, cfg: StageConfig) -> float:
    """Linear warm-up from 0.1 to 1, then linear decay to ``final_lr_frac`` (official LAPO)."""
    if step < cfg.warmup_steps:
        return 0.1 + 0.9 * step / max(1, cfg.warmup_steps)
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 1.0 + (cfg.final_lr_frac - 1.0) * min(frac, 1.0)


class MetricSums:
    """Scalar metrics summed over steps on their own device, read back in one transfer.

    Sums are fp64, starting from the first value, so the means equal what summing each step's
    ``.item()`` into a Python float gave (the same additions in the same precision)."""

    def __init__(self) -> None:
        self.steps = 0
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for k, v in metrics.items():
            v = torch.as_tensor(v).detach().to(torch.float64)
            if k in self._sums:
                self._sums[k].add_(v)
            else:
                self._sums[k] = v.clone()
        self.steps += 1

    def means(self) -> dict[str, float]:
        if not self._sums:
            return {}
        sums = torch.stack([v.reshape(()).to("cpu", non_blocking=False) for v in self._sums.values()]).tolist()
        return {k: s / max(1, self.steps) for k, s in zip(self._sums, sums)}


def compile_model(model: torch.nn.Module, mode: str = "default") -> Callable[..., Any]:
    """``torch.compile`` of a stage model's forward (AOTAutograd compiles the backward with it).

    ``mode="reduce-overhead"`` adds CUDA graphs on GPUs. The model's state stays in ``model``
    (checkpoints read the uncompiled module, without the ``_orig_mod.`` prefix)."""
    keep_dead_code_split_eager()
    return torch.compile(model, mode=None if mode == "default" else mode)


class StageStep:
    """Forward, backward, gradient clipping and AdamW for one batch already on ``device``.

    ``task`` is a ``loop.StageTask`` (only its ``loss`` is used here); ``train_model`` is what the
    loss runs through (the model, its DDP wrapper or their compiled form) and ``model`` the
    module whose parameters are clipped and stepped.
    """

    def __init__(self, task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: StageConfig,
                 device: torch.device, train_model: Callable[..., Any] | None = None):
        self.task, self.model, self.optimizer, self.cfg = task, model, optimizer, cfg
        self.device = device
        self.train_model = train_model if train_model is not None else model
        self.bf16 = use_bf16(cfg, device)
        self.metrics = MetricSums()

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Train on ``batch`` at schedule position ``step``; return the loss (not read back)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(step, self.cfg)
        self.model.train()
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, metrics = self.task.loss(self.train_model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.metrics.add({**metrics, "grad_norm": grad_norm})
        return loss.detach()

    def take_means(self) -> dict[str, float]:
        """The window's mean metrics (one host sync), and a fresh window."""
        means, self.metrics = self.metrics.means(), MetricSums()
        return means


def make_optimizer(model: torch.nn.Module, cfg: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on GPUs its fused kernel (one launch for all parameters instead of several per
    tensor). CPU keeps the default implementation, whose numbers the CPU tests pin."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {}))


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Conv weights in channels-last, the layout the models give their activations."""
    return model.to(memory_format=torch.channels_last)
