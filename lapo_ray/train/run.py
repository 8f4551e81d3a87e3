"""A trained run in plain Python, without Ray: ``load_run`` and ``export_run``.

``load_run`` reads a pretrain artifact folder (``stage1/checkpoint_*``, ``stage2/checkpoint_*``),
one stage-1 checkpoint, or an export folder (path or URI). An export folder is self-contained:

    config.json                  the resolved PretrainConfig the stage-1 model was trained with
    dynamics.safetensors         the stage-1 model's state_dict (IDM + world model, codebook included)
    latent_policy.safetensors    the stage-2 latent policy's state_dict, when the run has a stage 2
    probe.json                   the run's probe figures, when it has them
    README.md                    a model card: the figures and how to load it
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch

from lapo_ray import MissingPathError, UsageError, storage
from lapo_ray.config import ModelConfig
from lapo_ray.models.impala import frames_to_input, stack_frames
from lapo_ray.train.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    Checkpoint,
    load_dynamics,
    load_latent_policy,
    new_dynamics,
    new_latent_policy,
)

DYNAMICS_FILE, POLICY_FILE, PROBE_FILE = "dynamics.safetensors", "latent_policy.safetensors", "probe.json"


@dataclass
class Run:
    """A trained run's models, in eval mode: ``dynamics`` (the stage-1 ``LatentDynamics``), its
    ``idm`` and ``world_model``, and ``latent_policy`` (None without a stage 2); ``config`` is the
    resolved PretrainConfig as a dict and ``model_config`` its model part; ``stage1_steps`` the
    stage-1 checkpoint's step (None for an export, which keeps no training state)."""

    uri: str
    dynamics: torch.nn.Module
    latent_policy: torch.nn.Module | None
    config: dict[str, Any]
    model_config: ModelConfig
    stage1_steps: int | None = None

    @property
    def idm(self) -> torch.nn.Module:
        return self.dynamics.idm

    @property
    def world_model(self) -> torch.nn.Module:
        return self.dynamics.wm

    def latent_actions(self, frames: np.ndarray, batch_size: int = 256, device: str = "cpu") -> dict[str, np.ndarray]:
        """uint8 frames (T, H, W, C) of one video -> ``latent`` float32 (T - 2d, latent_dim) and
        ``codes`` int64 (T - 2d, num_codebooks, num_discrete_latents): row i labels the triplet
        (o[t-d], o[t], o[t+d]) with t = i + d, d the model's frame_offset."""
        d = self.model_config.frame_offset
        self._check_frames(frames, "frames", min_count=2 * d + 1)
        model = self.dynamics.to(device)
        centres = np.arange(d, len(frames) - d)
        latents, codes = [], []
        for start in range(0, len(centres), batch_size):
            t = centres[start:start + batch_size]
            triplets = np.stack([frames[t - d], frames[t], frames[t + d]], axis=1)
            latent, code = model.encode(torch.from_numpy(triplets).to(device))
            latents.append(latent.float().cpu().numpy())
            codes.append(code.cpu().numpy())
        return {"latent": np.concatenate(latents), "codes": np.concatenate(codes)}

    @torch.no_grad()
    def predict(self, o_prev: np.ndarray, o_now: np.ndarray, z: np.ndarray, device: str = "cpu") -> np.ndarray:
        """The world model's o[t+d] as uint8 frames (B, H, W, C), from uint8 frames (B, H, W, C)
        o[t-d] and o[t] and latent actions z (B, latent_dim). Like training, the world model sees
        z through the VQ codebook (its nearest codes), so a continuous latent from
        ``latent_actions`` or ``act`` can go in as it is."""
        self._check_frames(o_prev, "o_prev")
        self._check_frames(o_now, "o_now")
        z = torch.as_tensor(np.asarray(z), dtype=torch.float32, device=device)
        if z.shape != (len(o_prev), self.model_config.latent_dim) or len(o_now) != len(o_prev):
            raise UsageError(f"z: shape {tuple(z.shape)}, expected ({len(o_prev)}, {self.model_config.latent_dim}) "
                             f"with o_prev and o_now of {len(o_prev)} frames each (got {len(o_now)} for o_now)")
        model = self.dynamics.to(device)
        if self.model_config.vq.enabled:
            z = model.idm.vq(z, update=False)[0]
        pair = torch.from_numpy(np.stack([o_prev, o_now], axis=1)).to(device)
        pred = model.wm(stack_frames(frames_to_input(pair)), z).float()  # (B, C, H, W) in [-0.5, 0.5]
        pixels = ((pred + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def code_latents(self, codes: np.ndarray) -> np.ndarray:
        """The latent float32 (B, latent_dim) that VQ codes int (B, num_codebooks,
        num_discrete_latents) stand for: their codebook vectors, what the world model saw for a
        triplet given those codes (``predict`` takes it as it is)."""
        vq = self.model_config.vq
        codes = np.asarray(codes)
        if not vq.enabled:
            raise UsageError(f"{self.uri}: this run has no VQ (--model.vq.enabled false), so no codes")
        if codes.ndim != 3 or codes.shape[1:] != (vq.num_codebooks, vq.num_discrete_latents) or not (
                np.issubdtype(codes.dtype, np.integer) and ((codes >= 0) & (codes < vq.num_embs)).all()):
            raise UsageError(f"codes: expected integers in [0, {vq.num_embs}) of shape (B, {vq.num_codebooks}, "
                             f"{vq.num_discrete_latents}), got {codes.dtype} {codes.shape}")
        book = self.dynamics.idm.vq
        latent = book.codes_to_latent(torch.from_numpy(codes.astype(np.int64)).to(book.embeddings.device))
        return latent.float().cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, device: str = "cpu") -> np.ndarray:
        """The latent policy's latent action float32 (B, latent_dim) for uint8 observations (B, H, W, C)."""
        if self.latent_policy is None:
            raise UsageError(f"{self.uri}: this run has no stage 2 (latent policy), so it cannot act")
        self._check_frames(obs, "obs")
        return self.latent_policy.to(device)(torch.from_numpy(obs).to(device)).float().cpu().numpy()

    def _check_frames(self, frames: Any, name: str, min_count: int = 1) -> None:
        cfg = self.model_config
        want = (cfg.frame_size, cfg.frame_size, cfg.channels)
        shape = getattr(frames, "shape", None)
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or shape[1:] != want:
            raise UsageError(f"{name}: expected a uint8 numpy array (N, {', '.join(map(str, want))}) for this model, "
                             f"got {type(frames).__name__} {getattr(frames, 'dtype', '')} {shape}")
        if len(frames) < min_count:
            raise UsageError(f"{name}: {len(frames)} frames, but a triplet (frame offset "
                             f"{cfg.frame_offset}) needs at least {min_count}")


def load_run(uri: str | os.PathLike) -> Run:
    """A trained run from a pretrain artifact folder, a stage-1 checkpoint or an export folder."""
    uri = os.fspath(uri)
    if not storage.exists(uri):
        raise MissingPathError(f"{uri}: no such run folder")
    if storage.exists(storage.join(uri, DYNAMICS_FILE)):
        return _load_export(uri)
    stage1 = _stage1_checkpoint(uri)
    dynamics = load_dynamics(stage1.uri)
    stage2 = None if stage1.uri == uri else Checkpoint.latest(storage.join(uri, "stage2"))
    policy = None if stage2 is None else load_latent_policy(stage2.uri)[0]
    return Run(uri, dynamics, policy, stage1.config, stage1.model_config(), stage1.step)


def _stage1_checkpoint(uri: str) -> Checkpoint:
    """The run's latest stage-1 checkpoint, or ``uri`` itself when it is one."""
    if storage.exists(storage.join(uri, STATE_FILE)):
        ckpt = Checkpoint(uri)
        if ckpt.stage not in (None, "stage1"):
            raise UsageError(f"{uri}: a {ckpt.stage} checkpoint; give a pretrain run folder, a stage-1 checkpoint "
                             f"or an export")
        return ckpt
    ckpt = Checkpoint.latest(storage.join(uri, "stage1"))
    if ckpt is None:
        raise UsageError(f"{uri}: not a run: no stage1/checkpoint_* and no {DYNAMICS_FILE} (an export) in it")
    return ckpt


def _load_export(uri: str) -> Run:
    ckpt = Checkpoint(uri)  # an export's config.json is a checkpoint's, so it builds the same models
    cfg = ckpt.model_config()
    dynamics = _with_weights(new_dynamics(ckpt), storage.join(uri, DYNAMICS_FILE))
    policy_uri = storage.join(uri, POLICY_FILE)
    policy = _with_weights(new_latent_policy(cfg), policy_uri) if storage.exists(policy_uri) else None
    return Run(uri, dynamics, policy, ckpt.config, cfg)


def _with_weights(model: torch.nn.Module, uri: str) -> torch.nn.Module:
    model.load_state_dict(safetensors.torch.load(storage.read_bytes(uri)))
    return model.eval()


def export_run(run: str | os.PathLike, out: str | os.PathLike, replace: bool = False) -> str:
    """Write ``run``'s models, config, probe figures and a model card into the folder ``out``
    (path or URI), which must not exist yet (with ``replace``, it may hold an earlier export).
    Everything is written into a local temporary folder first and moved into place at the end,
    so a failed export leaves nothing half-written. Returns ``out``."""
    run, out = os.fspath(run), os.fspath(out)
    if storage.exists(out):
        if not storage.exists(storage.join(out, DYNAMICS_FILE)):
            raise UsageError(f"--out {out}: exists and is not an export; name a new folder")
        if not replace:
            raise UsageError(f"--out {out}: holds an export already; --replace true replaces it")
    loaded = load_run(run)
    probe_uri = storage.join(run, PROBE_FILE)
    probe = storage.read_json(probe_uri) if storage.exists(probe_uri) else None
    with tempfile.TemporaryDirectory() as tmp:
        _save_weights(loaded.dynamics, os.path.join(tmp, DYNAMICS_FILE))
        if loaded.latent_policy is not None:
            _save_weights(loaded.latent_policy, os.path.join(tmp, POLICY_FILE))
        storage.write_json(os.path.join(tmp, CONFIG_FILE), loaded.config)
        if probe is not None:
            storage.write_json(os.path.join(tmp, PROBE_FILE), probe)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(run, out, loaded, probe))
        storage.upload_dir(tmp, out)
    return out


def _save_weights(model: torch.nn.Module, path: str) -> None:
    # safetensors stores dense, unshared tensors: channels-last weights are made contiguous and
    # copied, and load_state_dict copies them back into the model's own layout.
    safetensors.torch.save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
                                path)


PROBE_FIGURES = [("probe_acc", "probe accuracy (trained IDM)"), ("floor_untrained_idm", "floor: untrained IDM"),
                 ("ceiling_supervised_idm", "ceiling: supervised IDM"), ("gap_closed", "share of the gap closed"),
                 ("nmi_trained", "code-action NMI")]


def model_card(run: str, out: str, loaded: Run, probe: dict[str, Any] | None) -> str:
    """The export's README.md: what it holds, the run's probe figures and how to load it."""
    cfg = loaded.model_config
    lines = [f"# LAPO run exported from `{run}`", "",
             f"Frames {cfg.frame_size}x{cfg.frame_size}x{cfg.channels} uint8, frame offset {cfg.frame_offset}, "
             f"latent dim {cfg.latent_dim}; latent policy: {'yes' if loaded.latent_policy is not None else 'no'}.",
             "", "## Probe", ""]
    if probe is None:
        lines.append("The run has no probe.json.")
    else:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {label} | {_figure(probe.get(key))} |" for key, label in PROBE_FIGURES]
    lines += ["", "## How to load", "", "```python", "import numpy as np", "from lapo_ray import load_run", "",
              f'run = load_run("{out}")  # needs lapo_ray and PyTorch, not Ray',
              f"frames = np.zeros((20, {cfg.frame_size}, {cfg.frame_size}, {cfg.channels}), np.uint8)  # one video",
              'labels = run.latent_actions(frames)  # labels["latent"], labels["codes"]', "```", ""]
    return "\n".join(lines)


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
