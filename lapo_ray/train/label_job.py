"""Label any corpus with a trained stage-1 checkpoint (``jobs/label.py``).

``--checkpoint`` is a pretrain run folder (its latest stage-1 checkpoint is taken), a stage-1
run folder (``<run>/stage1``) or one checkpoint folder (path or URI). The IDM is rebuilt from the
checkpoint's own ``config.json``: the frame size, the channels and the frame offset are the ones
it was trained with, whatever the flags say, so a corpus whose frames do not have that shape is
refused before Ray starts, as pretraining refuses it. Video folders are resized to the
checkpoint's frame size on decoding.

The corpus is scanned as pretraining scans it (``--data.on-bad-files skip`` leaves bad files out,
named) and labelled by ``labelling.label_corpus``: one Parquet shard per input file under
``<out>/latents/``, written atomically, kept by a rerun with the same checkpoint and files, and
``manifest.json`` last. ``<out>/label_job.json`` records the job's config and the checkpoint used.
"""

from __future__ import annotations

import json
import time
from typing import Any

from lapo_ray import MissingPathError, UsageError, storage
from lapo_ray.config import ModelConfig, config_from_dict
from lapo_ray.config.label import LabelJobConfig
from lapo_ray.data.mixture import open_corpus_sources
from lapo_ray.data.sources import Source
from lapo_ray.runtime import init_ray
from lapo_ray.train.checkpoint import latest_checkpoint
from lapo_ray.train.labelling import LATENTS_DIR, label_corpus

JOB_FILE = "label_job.json"


def resolve_checkpoint(uri: str) -> str:
    """The stage-1 checkpoint that ``uri`` names: itself when it holds ``model.pt``, else the
    latest ``checkpoint_*`` of ``<uri>/stage1`` or of ``uri``. Errors name ``uri``."""
    uri = storage.absolute(uri)
    if not storage.exists(uri):
        raise MissingPathError(f"--checkpoint {uri}: no such folder (give a pretrain run folder or a stage-1 "
                                "checkpoint)")
    if storage.exists(storage.join(uri, "model.pt")):
        ckpt = uri
    else:
        ckpt = latest_checkpoint(storage.join(uri, "stage1")) or latest_checkpoint(uri)
        if ckpt is None:
            raise MissingPathError(f"--checkpoint {uri}: no stage-1 checkpoint in it (neither model.pt nor "
                                    "stage1/checkpoint_* nor checkpoint_*); train stage 1 first (jobs/pretrain.py)")
    for name in ("config.json", "state.json"):
        if not storage.exists(storage.join(ckpt, name)):
            raise MissingPathError(f"--checkpoint {uri}: {storage.join(ckpt, name)} is missing; not a lapo_ray "
                                    "checkpoint")
    state = storage.read_json(storage.join(ckpt, "state.json"))
    stage = state.get("stage", "stage1") if isinstance(state, dict) else "stage1"
    if stage != "stage1":
        raise UsageError(f"--checkpoint {uri}: {ckpt} is a {stage} checkpoint; labelling needs stage 1's IDM "
                         "(the run folder or its stage1/ checkpoint)")
    return ckpt


def checkpoint_model_config(ckpt: str) -> ModelConfig:
    """The ModelConfig the checkpoint was trained with (its ``config.json``)."""
    uri = storage.join(ckpt, "config.json")
    cfg = storage.read_json(uri)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UsageError(f"{uri}: no model config in it; not a lapo_ray stage-1 checkpoint")
    try:
        return config_from_dict(ModelConfig, cfg["model"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"{uri}: its model config does not fit this version of lapo_ray ({e})") from e


def check_frame_shape(source: Source, model: ModelConfig, ckpt: str) -> None:
    """Pretraining's frame check, naming the checkpoint whose model sets the shape."""
    want = (model.frame_size, model.frame_size, model.channels)
    if tuple(source.frame_shape) != want:
        raise UsageError(f"{source.name}: frames are {tuple(source.frame_shape)} (H, W, C) but the model expects "
                         f"{want} (--model.frame-size {model.frame_size}, --model.channels {model.channels} of the "
                         f"checkpoint {ckpt})")


def open_label_input(cfg: LabelJobConfig) -> tuple[str, ModelConfig, Source]:
    """Checkpoint, its model config and the corpus, all checked before any Ray work."""
    ckpt = resolve_checkpoint(cfg.checkpoint)
    model = checkpoint_model_config(ckpt)
    source = open_corpus_sources(cfg.corpus, frame_size=(model.frame_size, model.frame_size))
    check_frame_shape(source, model, ckpt)
    return ckpt, model, source


def run_label(cfg: LabelJobConfig) -> dict[str, Any]:
    """Label every triplet centre of ``cfg.corpus`` with the checkpoint's IDM into
    ``<cfg.out>/latents/``; returns the manifest (also ``latents/manifest.json``)."""
    ckpt, model, source = open_label_input(cfg)
    out = storage.absolute(cfg.out)
    init_ray()
    t0 = time.monotonic()
    scan = source.scan(on_bad=cfg.data.on_bad_files)
    print(f"source {source.name}: {scan.summary()} (scanned in {time.monotonic() - t0:.0f}s)", flush=True)
    if not scan.files:
        raise UsageError(f"{source.name}: no usable file to label")
    print(f"labelling with {ckpt} (frames {model.frame_size}x{model.frame_size}x{model.channels}, latent "
          f"{model.latent_dim}, offset {model.frame_offset}) into {storage.join(out, LATENTS_DIR)}", flush=True)
    storage.makedirs(out)
    storage.write_json(storage.join(out, JOB_FILE), {"config": cfg.to_dict(), "checkpoint": ckpt})
    manifest = label_corpus(source, ckpt, out, cfg.label, files=scan.files, file_triplets=scan.file_triplets)
    manifest = {**manifest, "out": out, "bad_files": [list(b) for b in scan.bad_files]}
    print(json.dumps({k: manifest[k] for k in ("out", "rows", "shards", "shards_kept_from_earlier_run", "seconds")}),
          flush=True)
    return manifest
