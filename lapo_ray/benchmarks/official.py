"""The official LAPO code (schmidtdominik/LAPO), from a checkout the user gives: its stage-1 step
timed beside lapo_ray's, its trained IDM read as a probe encoder, and lapo_ray's weights written
in its layout (the fidelity study, docs/results/fidelity.py).

The official code is never part of lapo_ray: the user gives a checkout (``--official-lapo PATH``,
the repository or its ``lapo/`` folder), and its ``models.py`` is imported from there. That file
imports the official ``config`` and ``data_loader`` (which pull in its logger, omegaconf, wandb,
Procgen and the expert data), ``funcy`` and ``tensordict``; the step needs none of what they do
beyond a few names, so stand-ins for exactly those names are installed while it imports (the
real ``funcy`` and ``tensordict`` where they are installed) and removed after.

The step is the official ``train_step`` of ``stage1_idm.py``: the IDM labels the batch, the world
model predicts o[t+1], their summed losses go through AdamW with gradients clipped at 2, in fp32,
at the official config (IMPALA scale 4, U-Net base 24, VQ 2 x 4 latents of 16 dims, 64 codes), on
uint8 batches already on the device and normalised there as its loader does. Its loader itself,
host-side, is left out, as lapo_ray's own loader is in the step benchmark.

At equal sizes the two implementations' networks are the same parameter for parameter (IMPALA
channels 16/32/32 times a scale, 256 features, a U-Net with BatchNorm): only the names differ,
and ``dynamics_to_official`` / ``policy_to_official`` rename them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import time
import types
from typing import Any, Iterator

import torch

from lapo_ray import UsageError


@dataclasses.dataclass
class OfficialVQConfig:
    """The fields of the official ``config.VQConfig``, at its ``config.yaml`` values."""

    enabled: bool = True
    num_codebooks: int = 2
    num_discrete_latents: int = 4
    emb_dim: int = 16
    num_embs: int = 64
    commitment_cost: float = 0.05
    decay: float = 0.999


def _partition(n: int, step: int, seq) -> list[tuple]:
    """``funcy.partition(n, step, seq)``: the full windows of ``n`` items, one every ``step``."""
    items = list(seq)
    return [tuple(items[i : i + n]) for i in range(0, len(items) - n + 1, step)]


class _TensorDict(dict):
    """What the step uses of ``tensordict.TensorDict``: a dict that takes (and ignores) a batch size."""

    def __init__(self, source=None, batch_size=None, device=None, **kwargs):
        super().__init__(source or {}, **kwargs)


def _stand_ins(device: torch.device) -> dict[str, types.ModuleType]:
    config = types.ModuleType("config")
    config.VQConfig, config.ADD_TIME_HORIZON, config.DEVICE = OfficialVQConfig, 1, str(device)
    data_loader = types.ModuleType("data_loader")
    data_loader.normalize_obs = lambda obs: obs.float() / 255 - 0.5
    mods = {"config": config, "data_loader": data_loader}
    if importlib.util.find_spec("funcy") is None:
        mods["funcy"] = types.ModuleType("funcy")
        mods["funcy"].partition = _partition
    if importlib.util.find_spec("tensordict") is None:
        mods["tensordict"] = types.ModuleType("tensordict")
        mods["tensordict"].TensorDict = _TensorDict
    return mods


@contextlib.contextmanager
def _modules(mods: dict[str, types.ModuleType]) -> Iterator[None]:
    """``mods`` in ``sys.modules`` for the duration, whatever was there put back after."""
    before = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def official_models_file(checkout: str) -> str:
    for path in (os.path.join(checkout, "lapo", "models.py"), os.path.join(checkout, "models.py")):
        if os.path.isfile(path):
            return path
    raise UsageError(f"--official-lapo {checkout}: no lapo/models.py or models.py there; give a checkout of "
                     "schmidtdominik/LAPO")


def load_official_models(checkout: str, device: torch.device) -> types.ModuleType:
    """The official ``models`` module, imported from the checkout under a name of its own."""
    path = official_models_file(checkout)
    spec = importlib.util.spec_from_file_location("lapo_official_models", path)
    module = importlib.util.module_from_spec(spec)
    with _modules(_stand_ins(device)):
        spec.loader.exec_module(module)
    return module


def _checkout_commit(checkout: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def time_official_step(checkout: str, device: torch.device, batch_size: int = 128, steps: int = 50,
                       warmup: int = 10) -> dict[str, Any]:
    """Samples/s and step time of the official stage-1 step; with no checkout, why not."""
    if not checkout:
        return {"timed": False, "why": "no --official-lapo checkout given", "samples_per_s": None, "step_ms": None}
    models = load_official_models(checkout, device)
    vq = OfficialVQConfig()
    latent_dim = vq.num_codebooks * vq.num_discrete_latents * vq.emb_dim
    torch.manual_seed(0)
    idm = models.IDM(vq, (9, 64, 64), latent_dim, 4).to(device)
    wm = models.WorldModel(latent_dim, in_depth=6, out_depth=3, base_size=24).to(device)
    params = [*idm.parameters(), *wm.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-4)
    frames = [torch.randint(0, 256, (batch_size, 3, 3, 64, 64), dtype=torch.uint8, device=device) for _ in range(4)]

    def step(i: int) -> None:
        batch = _TensorDict({"obs": frames[i % len(frames)].float() / 255 - 0.5})
        idm.train(), wm.train()
        vq_loss, _ = idm.label(batch)
        loss = wm.label(batch) + vq_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2)
        opt.step()

    seconds = _timed(step, warmup, steps, device)
    return {"timed": True, "why": None, "checkout": os.path.abspath(checkout), "commit": _checkout_commit(checkout),
            "precision": "fp32", "batch_size": batch_size, "steps": steps, "warmup": warmup,
            "parameters": sum(p.numel() for p in params), "samples_per_s": batch_size * steps / seconds,
            "step_ms": 1000 * seconds / steps}


def _timed(step, warmup: int, steps: int, device: torch.device) -> float:
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def official_idm_encoder(checkout: str, weights: str, vq: OfficialVQConfig, impala_scale: int,
                         device: torch.device = torch.device("cpu")):
    """A trained official IDM (the ``idm`` state dict in ``weights``) as lapo_ray's probe reads an
    encoder: uint8 triplets (B, 3, H, W, C) in, its continuous latent ``la`` (what the official
    ``eval_latent_repr`` decodes too) and its codes (B, codebooks, latents) out. The frames are
    normalised as the official loader does (``obs / 255 - 0.5``, channels first, the three frames
    stacked by its ``merge_TC_dims``)."""
    models = load_official_models(checkout, device)
    latent_dim = vq.num_codebooks * vq.num_discrete_latents * vq.emb_dim
    idm = models.IDM(vq, (9, 64, 64), latent_dim, impala_scale).to(device)
    idm.load_state_dict(torch.load(weights, map_location=device)["idm"])
    idm.eval()

    @torch.no_grad()
    def encode(frames: torch.Tensor) -> dict[str, torch.Tensor]:
        x = frames.to(device).permute(0, 1, 4, 2, 3).contiguous().float() / 255 - 0.5
        out, _, _ = idm(x)
        return {"latent": out["la"], "codes": out["la_qinds"].reshape(len(x), vq.num_codebooks, vq.num_discrete_latents)}

    return encode


# ---- lapo_ray's weights in the official layout ------------------------------------------------

_VQ_BUFFERS = {"embeddings": "embedding", "ema_cluster_size": "ema_count", "ema_w": "ema_weight"}


def _impala_key(key: str) -> str:
    """lapo_ray's ImpalaCNN (``convs.i.resj.convk``, ``fc``) -> the official ``get_impala``
    (``conv_stack.i.res_blockj.convk``, ``fc``)."""
    key = re.sub(r"^convs\.(\d+)\.res(\d)\.", r"conv_stack.\1.res_block\2.", key)
    return re.sub(r"^convs\.", "conv_stack.", key)


def _residual_key(key: str) -> str:
    """lapo_ray's ResidualLayer (``conv0``, ``conv1``) -> the official Sequential(ReLU, Conv,
    ReLU, Conv), whose convolutions are its items 1 and 3."""
    return key.replace("res.conv0.", "res.res_block.1.").replace("res.conv1.", "res.res_block.3.")


def dynamics_to_official(state: dict[str, torch.Tensor], frame_size: int = 64
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A lapo_ray ``LatentDynamics`` state dict as the official ``IDM`` and ``WorldModel`` ones
    (``idm_fdm.pt``'s ``idm`` and ``wm``). The U-Net's bottleneck is the official ``down``'s
    last item, after its log2(frame size) - 1 downsampling blocks."""
    levels = frame_size.bit_length() - 2
    idm, wm = {}, {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part == "idm" and rest.startswith("encoder."):
            idm[_impala_key(rest.removeprefix("encoder."))] = value
        elif part == "idm" and rest.startswith("head."):
            idm["policy_head." + rest.removeprefix("head.")] = value
        elif part == "idm" and rest.startswith("vq."):
            idm["vq." + _VQ_BUFFERS[rest.removeprefix("vq.")]] = value
        elif part == "wm":
            rest = re.sub(r"^bottleneck\.", f"down.{levels}.", rest)
            rest = re.sub(r"^head\.1\.conv([01])\.", lambda m: f"final_conv.1.res_block.{1 + 2 * int(m[1])}.", rest)
            wm[_residual_key(re.sub(r"^head\.", "final_conv.", rest))] = value
        else:
            raise UsageError(f"{key}: no official counterpart (the action head of --stage1.action-labels has none)")
    return idm, wm


def policy_to_official(state: dict[str, torch.Tensor], value_head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A lapo_ray ``LatentPolicy`` state dict as the official ``Policy``'s, with ``value_head``
    (an official policy's own, untrained: lapo_ray's latent policy has none, and the official
    stage 3 loads strictly)."""
    out = {}
    for key, value in state.items():
        if key.startswith("encoder.cnn."):
            out[_impala_key(key.removeprefix("encoder.cnn."))] = value
        elif key.startswith("head."):
            out["policy_head." + key.removeprefix("head.")] = value
        else:
            raise UsageError(f"{key}: no official counterpart")
    return {**out, **{"value_head." + k: v for k, v in value_head.items()}}
