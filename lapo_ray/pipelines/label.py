"""Label any corpus with a trained stage-1 checkpoint (``jobs/label.py``).

``--checkpoint`` is a pretrain run folder (its latest stage-1 checkpoint is taken), a stage-1
run folder (``<run>/stage1``) or one checkpoint folder (path or URI). The IDM is rebuilt from the
checkpoint's own ``config.json``: the frame size, the channels and the frame offset are the ones
it was trained with, whatever the flags say, so a corpus whose frames do not have that shape is
refused before Ray starts, as pretraining refuses it. Video folders are resized to the
checkpoint's frame size on decoding.

The corpus is scanned as pretraining scans it (``--data.on-bad-files skip`` leaves bad files out,
named) and labelled by ``train.labelling.label_corpus``: one Parquet shard per input file under
``<out>/latents/``, written atomically, kept by a rerun with the same checkpoint and files, and
``manifest.json`` last. ``<out>/label_job.json`` records the job's config and the checkpoint used.
"""

from __future__ import annotations

import json
import time
from typing import Any

from lapo_ray import MissingPathError, UsageError, storage
from lapo_ray.config import ModelConfig
from lapo_ray.config.label import LabelJobConfig
from lapo_ray.data.mixture import open_corpus_sources
from lapo_ray.data.sources import Source
from lapo_ray.pipelines.pretrain import check_frame_shape
from lapo_ray.runtime import init_ray
from lapo_ray.train.checkpoint import CONFIG_FILE, STATE_FILE, Checkpoint
from lapo_ray.train.labelling import LATENTS_DIR, label_corpus

JOB_FILE = "label_job.json"


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
    print(f"labelling with {ckpt.uri} (frames {model.frame_size}x{model.frame_size}x{model.channels}, latent "
          f"{model.latent_dim}, offset {model.frame_offset}) into {storage.join(out, LATENTS_DIR)}", flush=True)
    storage.makedirs(out)
    storage.write_json(storage.join(out, JOB_FILE), {"config": cfg.to_dict(), "checkpoint": ckpt.uri})
    manifest = label_corpus(source, ckpt.uri, out, cfg.label, files=scan.files, file_triplets=scan.file_triplets)
    manifest = {**manifest, "out": out, "bad_files": [list(b) for b in scan.bad_files]}
    print(json.dumps({k: manifest[k] for k in ("out", "rows", "shards", "shards_kept_from_earlier_run", "seconds")}),
          flush=True)
    return manifest


def open_label_input(cfg: LabelJobConfig) -> tuple[Checkpoint, ModelConfig, Source]:
    """Checkpoint, its model config and the corpus, all checked before any Ray work."""
    ckpt = resolve_checkpoint(cfg.checkpoint)
    model = ckpt.model_config()
    source = open_corpus_sources(cfg.corpus, frame_size=(model.frame_size, model.frame_size))
    check_frame_shape(source, model, f" of the checkpoint {ckpt.uri}")
    return ckpt, model, source


def resolve_checkpoint(uri: str) -> Checkpoint:
    """The stage-1 checkpoint that ``uri`` names: itself when it holds ``model.pt``, else the
    latest ``checkpoint_*`` of ``<uri>/stage1`` or of ``uri``. Errors name ``uri``."""
    uri = storage.absolute(uri)
    if not storage.exists(uri):
        raise MissingPathError(f"--checkpoint {uri}: no such folder (give a pretrain run folder or a stage-1 "
                               "checkpoint)")
    if storage.exists(storage.join(uri, "model.pt")):
        ckpt = Checkpoint(uri)
    else:
        ckpt = Checkpoint.latest(storage.join(uri, "stage1")) or Checkpoint.latest(uri)
        if ckpt is None:
            raise MissingPathError(f"--checkpoint {uri}: no stage-1 checkpoint in it (neither model.pt nor "
                                   "stage1/checkpoint_* nor checkpoint_*); train stage 1 first (jobs/pretrain.py)")
    for name in (CONFIG_FILE, STATE_FILE):
        if not storage.exists(storage.join(ckpt.uri, name)):
            raise MissingPathError(f"--checkpoint {uri}: {storage.join(ckpt.uri, name)} is missing; not a lapo_ray "
                                   "checkpoint")
    if ckpt.stage not in (None, "stage1"):
        raise UsageError(f"--checkpoint {uri}: {ckpt.uri} is a {ckpt.stage} checkpoint; labelling needs stage 1's "
                         "IDM (the run folder or its stage1/ checkpoint)")
    return ckpt
