"""Stages 1 and 2 end to end: corpus -> stage 1 -> probe report -> labelling -> stage 2 -> plots.

Everything lands in one artifact folder (local path or URI)::

    config.json  metrics.jsonl  source_scan.json  stage1/  probe.json  latents/  stage2/
    plots/training_curves.png  plots/latent_map.png  report.md

Each stage is skipped when the folder already holds its finished result and resumed from its
latest checkpoint when it holds an unfinished one, so running the job again continues it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from lapo_ray import storage
from lapo_ray.config import PipelineConfig, PretrainConfig
from lapo_ray.data.sources import Source, open_source
from lapo_ray.data.triplets import SplitSpec, iter_batches, triplet_dataset
from lapo_ray.train.checkpoint import latest_checkpoint, load_dynamics
from lapo_ray.train.labelling import SPLIT_FILE, label_corpus, latents_dataset
from lapo_ray.train.metrics import MetricsSink, read_metrics
from lapo_ray.train.stages import ProbeSet, Stage1Task, Stage2Task
from lapo_ray.train.trainer import fit_stage


def _eval_pipeline(pipe: PipelineConfig) -> PipelineConfig:
    """Same split, source order, no shuffling: for validation and probe sets."""
    return dataclasses.replace(pipe, global_shuffle="none", local_shuffle_buffer=0)


def load_probe_set(source: Source, pipe: PipelineConfig, n: int, files: list[str], spec: SplitSpec) -> ProbeSet | None:
    """Up to ``n`` labelled triplets from the validation episodes (never trained on)."""
    from lapo_ray.evaluation.probe import probe_halves

    if not source.has_actions or n <= 0:
        return None
    parts, have = [], 0
    ds = triplet_dataset(source, "val", _eval_pipeline(pipe), files, spec)
    for b in iter_batches(ds, source.frame_shape, 512, _eval_pipeline(pipe)):
        keep = b["action"] >= 0
        parts.append({k: b[k][keep] for k in ("frames", "action", "episode_id")})
        have += int(keep.sum())
        if have >= n:
            break
    if have < 32:
        print(f"probe: only {have} labelled validation triplets; skipping the probe", flush=True)
        return None
    cat = {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
    return ProbeSet(cat["frames"], cat["action"].astype(np.int64), probe_halves(cat["episode_id"]))


def _stage_done(stage_uri: str) -> str | None:
    ckpt = latest_checkpoint(stage_uri)
    if ckpt is None:
        return None
    state = json.loads(storage.read_bytes(f"{ckpt}/state.json"))
    return ckpt if state.get("done") else None


def _save_png(fig_fn, out_uri: str, name: str, *args) -> str:
    uri = storage.join(out_uri, "plots", name)
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, name)
        fig_fn(*args, local)
        with open(local, "rb") as f:
            storage.write_bytes(uri, f.read())
    return uri


def open_corpus(cfg: PretrainConfig) -> Source | None:
    """The source to train on, opened and checked against the model before any Ray work: the
    path exists, its kind is known and its frames have the model's shape. None when the default
    corpus still has to be collected."""
    corpus = cfg.corpus or cfg.collect.out
    if not cfg.corpus and not storage.exists(storage.join(corpus, "manifest.json")):
        return None
    source = open_source(corpus, frame_size=(cfg.model.frame_size, cfg.model.frame_size))
    check_frame_shape(source, cfg)
    return source


def check_frame_shape(source: Source, cfg: PretrainConfig) -> None:
    want = (cfg.model.frame_size, cfg.model.frame_size, cfg.model.channels)
    if tuple(source.frame_shape) != want:
        raise ValueError(f"{source.name}: frames are {tuple(source.frame_shape)} (H, W, C) but the model expects "
                         f"{want} (--model.frame-size {cfg.model.frame_size}, --model.channels {cfg.model.channels})")


def check_artifact_folder(cfg: PretrainConfig) -> None:
    """Refuse to continue a run in ``cfg.out`` under another config unless asked: a typo in
    --out would otherwise mix two experiments into one folder."""
    from lapo_ray.config import config_changes

    uri = storage.join(cfg.out, "config.json")
    if cfg.allow_config_change or not storage.exists(uri):
        return
    old, new = storage.read_json(uri), cfg.to_dict()
    if not isinstance(old, dict):
        raise ValueError(f"{uri}: not a lapo_ray config")
    old.pop("allow_config_change", None)
    new.pop("allow_config_change")
    changes = config_changes(old, new)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ValueError(f"{cfg.out} holds a run with another config ({shown}); give another --out, or pass "
                         "--allow-config-change true to continue that run with this config")


def split_spec(scan, pipe: PipelineConfig) -> SplitSpec:
    return SplitSpec.for_episodes(scan.episode_ids, pipe.val_fraction, pipe.split_seed)


def probe_references(cfg: PretrainConfig, source: Source, files: list[str], spec: SplitSpec, probe: ProbeSet,
                     checkpoint: str, steps_done: int) -> dict[str, Any]:
    """probe.json: trained IDM vs majority, floor (untrained IDM) and ceiling (supervised IDM)."""
    from lapo_ray.evaluation.ceiling import ceiling_accuracy, train_ceiling
    from lapo_ray.evaluation.probe import encode_in_batches, majority_rate, probe_accuracy, probe_report
    from lapo_ray.models import LatentDynamics

    trained = load_dynamics(checkpoint)
    torch.manual_seed(cfg.stage1.seed)  # the floor: the very initialisation stage 1 started from
    untrained = LatentDynamics(cfg.model).eval()
    acc = {}
    latents = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        latents[name] = encode_in_batches(lambda f, m=model: m.encode(f)[0], probe.frames)
        acc[name] = probe_accuracy(latents[name], probe.actions, probe.test_mask, cfg.probe)
    ceiling = None
    if cfg.probe.ceiling:
        t0 = time.monotonic()
        train_ds = triplet_dataset(source, "train", cfg.data, files, spec)
        model = train_ceiling(train_ds, cfg.model, cfg.stage1, cfg.data, steps=steps_done, seed=cfg.stage1.seed)
        ceiling = ceiling_accuracy(model, probe.frames, probe.actions, probe.test_mask)
        print(f"ceiling: {steps_done} steps in {time.monotonic() - t0:.0f}s, accuracy {ceiling:.3f}", flush=True)
    report = probe_report(acc["trained"], acc["untrained"], ceiling, majority_rate(probe.actions, probe.test_mask))
    report["stage1_steps"] = steps_done
    report["probe_set"] = "validation episodes, split in halves by episode"
    return report, latents["trained"]


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run the stages in ``cfg.stages`` and return a summary (also written to report.md)."""
    from lapo_ray.runtime import init_ray

    source = open_corpus(cfg)
    if source is None:
        check_artifact_folder(cfg)  # collecting takes minutes: refuse a mismatched --out before it
    init_ray()
    if source is None:
        from lapo_ray.data.collect import collect

        print(f"no --corpus given: collecting the default corpus into {cfg.collect.out}", flush=True)
        collect(cfg.collect)
        source = open_corpus(cfg)
    scan = source.scan(on_bad=cfg.data.on_bad_files)
    spec = split_spec(scan, cfg.data)
    check_artifact_folder(cfg)
    # Only now, with every input checked, does anything go into the artifact folder.
    out = cfg.out
    storage.makedirs(out)
    storage.write_json(storage.join(out, "config.json"), cfg.to_dict())
    run_config = cfg.to_dict()
    stages = cfg.stage_list()
    summary: dict[str, Any] = {"out": out}
    print(f"source {source.name}: {scan.summary()}; {len(spec.val_episodes)} of {len(scan.episode_ids)} "
          "episodes for validation", flush=True)
    storage.write_json(storage.join(out, "source_scan.json"), dataclasses.asdict(scan))
    storage.write_json(storage.join(out, SPLIT_FILE), spec.to_dict())
    summary["source"] = {"name": source.name, **{k: v for k, v in dataclasses.asdict(scan).items()
                                                  if k not in ("files", "episode_ids")}}

    stage1_uri = storage.join(out, "stage1")
    if "stage1" in stages:
        probe = load_probe_set(source, cfg.data, cfg.probe.triplets, scan.files, spec)
        ckpt = _stage_done(stage1_uri)
        if ckpt is None:
            t0 = time.monotonic()
            result = fit_stage(
                Stage1Task(cfg.model, cfg.probe, probe), cfg.stage1, cfg.data,
                triplet_dataset(source, "train", cfg.data, scan.files, spec),
                triplet_dataset(source, "val", _eval_pipeline(cfg.data), scan.files, spec),
                out, run_config, MetricsSink(out, "stage1", cfg.wandb, run_config),
            )
            summary["stage1_seconds"] = round(time.monotonic() - t0, 1)
            ckpt = latest_checkpoint(stage1_uri)
            if result.error:
                raise RuntimeError(f"stage 1 failed: {result.error}")
        state = json.loads(storage.read_bytes(f"{ckpt}/state.json"))
        summary["stage1"] = {"checkpoint": ckpt, "steps": state["step"], "train_seconds": state["train_seconds"]}
        if probe is not None and not storage.exists(storage.join(out, "probe.json")):
            report, latents = probe_references(cfg, source, scan.files, spec, probe, ckpt, state["step"])
            storage.write_json(storage.join(out, "probe.json"), report)
            _save_png(_latent_map, out, "latent_map.png", latents, probe.actions)
        if storage.exists(storage.join(out, "probe.json")):
            summary["probe"] = storage.read_json(storage.join(out, "probe.json"))

    if "label" in stages:
        ckpt = latest_checkpoint(stage1_uri)
        if ckpt is None:
            raise FileNotFoundError(f"{stage1_uri}: no stage-1 checkpoint to label with (run stage1 first)")
        summary["latents"] = label_corpus(source, ckpt, out, cfg.label, cfg.data)

    if "stage2" in stages:
        stage2_uri = storage.join(out, "stage2")
        ckpt = _stage_done(stage2_uri)
        if ckpt is None:
            t0 = time.monotonic()
            result = fit_stage(
                Stage2Task(cfg.model), cfg.stage2, cfg.data,
                latents_dataset(out, "train", cfg.data), latents_dataset(out, "val", _eval_pipeline(cfg.data)),
                out, run_config, MetricsSink(out, "stage2", cfg.wandb, run_config),
            )
            if result.error:
                raise RuntimeError(f"stage 2 failed: {result.error}")
            summary["stage2_seconds"] = round(time.monotonic() - t0, 1)
            ckpt = latest_checkpoint(stage2_uri)
        summary["stage2"] = {"checkpoint": ckpt}

    rows = read_metrics(out)
    if rows:
        _save_png(_curves, out, "training_curves.png", rows)
    write_report(out, summary, rows)
    return summary


def _curves(rows, path):
    from lapo_ray.evaluation.plots import plot_training_curves

    plot_training_curves(rows, path)


def _latent_map(latents, actions, path):
    from lapo_ray.evaluation.plots import plot_latent_map

    plot_latent_map(latents, actions, path, title="stage-1 latent actions on held-out triplets (PCA)")


def write_report(out: str, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    lines = ["# lapo_ray pretraining report", "", f"Source: `{summary['source']['name']}` "
             f"({summary['source']['frames']:,} frames, {summary['source']['episodes']:,} episodes, "
             f"{summary['source']['triplets']:,} triplets).", ""]
    if "probe" in summary:
        p = summary["probe"]
        lines += ["## Latent-action probe (held-out episodes)", "",
                  "| | accuracy |", "|---|---|",
                  f"| trained IDM (no labels) | {p['probe_acc']:.3f} |",
                  f"| floor: untrained IDM | {p['floor_untrained_idm']:.3f} |",
                  f"| majority action | {p['majority_rate']:.3f} |"]
        if "ceiling_supervised_idm" in p:
            closed = "undefined (the ceiling is not above the floor)" if p["gap_closed"] is None else f"{p['gap_closed']:.2f}"
            lines += [f"| ceiling: IDM trained on true actions | {p['ceiling_supervised_idm']:.3f} |", "",
                      f"**Share of the floor-to-ceiling gap closed: {closed}**"]
        lines += ["", f"Probe: {p['n_train']} train / {p['n_test']} test triplets, after "
                  f"{p['stage1_steps']} stage-1 steps.", "", "![latent map](plots/latent_map.png)", ""]
    last = {}
    for r in rows:
        last[r["stage"]] = r
    for stage in ("stage1", "stage2"):
        if stage in last:
            r = last[stage]
            lines += [f"## {stage}", "", f"step {r['step']}, {r['samples_per_s']:.0f} samples/s "
                      f"({r['world_size']} worker(s)), data wait {100 * r['data_wait_frac']:.0f}%", ""]
            lines += [f"- {k}: {v:.4g}" for k, v in sorted(r.items()) if "/" in k and isinstance(v, float)]
            lines.append("")
    lines += ["![training curves](plots/training_curves.png)", ""]
    storage.write_bytes(storage.join(out, "report.md"), "\n".join(lines).encode())
