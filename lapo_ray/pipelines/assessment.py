"""Steps that assess a trained stage 1, shared by ``pretrain.py`` and ``probe.py`` so that a run's
own report and a later probe of its checkpoint compute the same figures the same way: the
models the probe reads (the trained IDM, the floor, the ceiling), the held-out codes of a corpus
without actions, and the latent-action atlas."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lapo_ray import storage
from lapo_ray.config import PretrainConfig
from lapo_ray.config.probe import ATLAS_CONTEXTS, ATLAS_ROWS
from lapo_ray.data.sources import Source
from lapo_ray.data.splits import SplitSpec
from lapo_ray.evaluation.atlas import atlas_rows, atlas_summary, plot_atlas
from lapo_ray.evaluation.references import Encoder, encode_held_out, idm_encoder, supervised_encoder
from lapo_ray.models import LatentDynamics
from lapo_ray.train.checkpoint import Checkpoint, load_supervised_idm
from lapo_ray.train.run import Run

ATLAS_FILE = "atlas.png"


def reference_encoders(cfg: PretrainConfig, trained: torch.nn.Module, ceiling: Checkpoint | None) -> dict[str, Encoder]:
    """What the probe reads: the trained IDM, the floor (an untrained IDM of ``cfg.model``, the
    very initialisation stage 1 started from) and, given its checkpoint, the ceiling."""
    torch.manual_seed(cfg.stage1.seed)
    encoders = {"trained": idm_encoder(trained), "untrained": idm_encoder(LatentDynamics(cfg.model).eval())}
    if ceiling is not None:
        encoders["supervised"] = supervised_encoder(load_supervised_idm(ceiling.uri))
    return encoders


def held_out_codes(cfg: PretrainConfig, source: Source, files: list[str], spec: SplitSpec, trained: torch.nn.Module,
                   contexts: int = ATLAS_CONTEXTS) -> dict[str, np.ndarray]:
    """The trained IDM's latents and codes on up to ``cfg.probe.triplets`` validation triplets,
    with or without true actions, and ``contexts`` of them whole for the atlas."""
    return encode_held_out(source, cfg.data, cfg.probe.triplets, files, spec, {"trained": idm_encoder(trained)},
                           cfg.model.frame_offset, contexts)


def has_codes(run: Run, enc: dict[str, np.ndarray] | None) -> bool:
    """Whether ``enc`` holds discrete codes to rank and contexts to draw them on: not without VQ,
    whose zero codes say nothing."""
    return (enc is not None and run.model_config.vq.enabled and "trained/codes" in enc
            and len(enc["trained/codes"]) > 0 and len(enc.get("context/frames", ())) > 0)


def draw_atlas(plots: str, run: Run, enc: dict[str, np.ndarray], rows: int = ATLAS_ROWS) -> dict[str, Any] | None:
    """``<plots>/atlas.png`` of ``run``'s ``rows`` most used latent actions on ``enc``'s contexts;
    returns its figures (``atlas_summary``), None where ``has_codes`` says there is nothing to draw."""
    if not has_codes(run, enc):
        return None
    actions = enc["action"] if (enc["action"] >= 0).any() else None
    contexts = {"frames": enc["context/frames"], "action": enc["context/action"]}
    atlas = atlas_rows(enc["trained/codes"], actions, contexts, run.predict, run.code_latents, rows)
    plot_atlas(atlas, storage.join(plots, ATLAS_FILE))
    return atlas_summary(atlas)
