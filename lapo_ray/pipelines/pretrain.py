"""Stages 1 and 2 end to end: corpus -> stage 1 -> probe report -> labelling -> stage 2 -> plots.

Everything lands in one artifact folder (local path or URI)::

    config.json  metrics.jsonl  source_scan.json  split.json  stage1/  ceiling/  probe.json  latents/
    stage2/  plots/training_curves.png  plots/latent_map.png  plots/atlas.png  report.md

Each stage is skipped when the folder already holds its finished result and resumed from its
latest checkpoint when it holds an unfinished one, so running the job again continues it.
``run_pretrain`` reads as its steps; each step below calls the rooms beneath: the stage loop
(``train``), the probe (``evaluation``), the corpus (``data``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from lapo_ray import MissingPathError, UsageError, storage
from lapo_ray.config import ModelConfig, PipelineConfig, PretrainConfig, config_changes, config_from_dict
from lapo_ray.config.probe import ATLAS_CONTEXTS
from lapo_ray.data.collect import collect
from lapo_ray.data.mixture import open_corpus_sources
from lapo_ray.data.sources import ScanReport, Source
from lapo_ray.data.splits import SplitSpec
from lapo_ray.data.triplets import eval_pipeline, triplet_dataset
from lapo_ray.evaluation.plots import plot_latent_map, plot_training_curves
from lapo_ray.evaluation.probe import TrainingProbe
from lapo_ray.evaluation.references import Encoder, load_probe_set, probe_per_source, probe_references
from lapo_ray.evaluation.reports import render_pretrain_report
from lapo_ray.pipelines.assessment import ATLAS_FILE, draw_atlas, held_out_codes, reference_encoders
from lapo_ray.runtime import init_ray
from lapo_ray.train.checkpoint import Checkpoint, load_dynamics
from lapo_ray.train.labelling import SPLIT_FILE, label_corpus, latents_dataset
from lapo_ray.train.metrics import WandbRun, read_metrics
from lapo_ray.train.run import load_run
from lapo_ray.train.stage1 import check_device_resident, stage1_task
from lapo_ray.train.stages import Stage2Task, SupervisedIDMTask
from lapo_ray.train.trainer import fit_into


def run_pretrain(cfg: PretrainConfig, policy_factories=None) -> dict[str, Any]:
    """Run the stages in ``cfg.stages`` and return a summary (also written to report.md).
    ``policy_factories`` go to the default corpus's collection (see ``data.collect.collect``)."""
    source, scan, spec = checked_input(cfg, policy_factories)
    # Only now, with every input checked, does anything go into the artifact folder.
    summary = record_input(cfg, source, scan, spec)
    run_config = cfg.to_dict()
    stages = cfg.stage_list()
    if "stage1" in stages:
        summary.update(stage1_and_probe(cfg, source, scan, spec, run_config))
    if "label" in stages:
        summary["latents"] = label_latents(cfg, source, scan)
    if "stage2" in stages:
        summary.update(train_stage2(cfg, run_config))
    report(cfg.out, summary)
    return summary


# ---- input: checked before anything is written -----------------------------------------------


def checked_input(cfg: PretrainConfig, policy_factories) -> tuple[Source, ScanReport, SplitSpec]:
    """The corpus (collected first when none is given), every file of it scanned, its split, and
    the artifact folder checked against the config: whatever fails, fails before a write."""
    source = open_corpus(cfg)
    if source is None:
        check_artifact_folder(cfg)  # collecting takes minutes: refuse a mismatched --out before it
    init_ray()
    if source is None:
        print(f"no --corpus given: collecting the default corpus into {cfg.collect.out}", flush=True)
        collect(cfg.collect, policy_factories=policy_factories)
        source = open_corpus(cfg)
    scan = source.scan(on_bad=cfg.data.on_bad_files)
    spec = split_spec(scan, cfg.data, source)
    check_artifact_folder(cfg)
    if "stage1" in cfg.stage_list():
        check_device_resident(cfg, source, scan, spec)  # a split too large for the devices: before any write
    return source, scan, spec


def open_corpus(cfg: PretrainConfig) -> Source | None:
    """The source to train on, opened and checked against the model before any Ray work: the
    path exists, its kind is known and its frames have the model's shape. None when the default
    corpus still has to be collected. Several sources (``--corpus A=0.7,B=0.3``) are one
    ``MultiSource`` (``data.mixture``)."""
    corpus = cfg.corpus or cfg.collect.out
    if not cfg.corpus and not storage.exists(storage.join(corpus, "manifest.json")):
        return None
    source = open_corpus_sources(corpus, frame_size=(cfg.model.frame_size, cfg.model.frame_size))
    check_frame_shape(source, cfg.model)
    return source


def check_frame_shape(source: Source, model: ModelConfig, model_from: str = "") -> None:
    """Refuse a corpus whose frames do not have ``model``'s shape; ``model_from`` says where that
    model comes from when not from the flags (" of the checkpoint ...")."""
    want = (model.frame_size, model.frame_size, model.channels)
    if tuple(source.frame_shape) != want:
        raise UsageError(f"{source.name}: frames are {tuple(source.frame_shape)} (H, W, C) but the model expects "
                         f"{want} (--model.frame-size {model.frame_size}, --model.channels {model.channels}"
                         f"{model_from})")


def check_artifact_folder(cfg: PretrainConfig) -> None:
    """Refuse to continue a run in ``cfg.out`` under another config unless asked: a typo in
    --out would otherwise mix two experiments into one folder."""
    uri = storage.join(cfg.out, "config.json")
    if cfg.allow_config_change or not storage.exists(uri):
        return
    old, new = storage.read_json(uri), cfg.to_dict()
    if not isinstance(old, dict):
        raise UsageError(f"{uri}: not a lapo_ray config")
    try:
        # A field the folder's config lacks counts at its default, which keeps the behaviour the
        # run was made with: no change.
        old = config_from_dict(PretrainConfig, old).to_dict()
    except (ValueError, TypeError):
        pass  # keys this version does not know: compare as written, and name them below
    # Neither the permission itself nor where the logs go (wandb's mode, project, group)
    # changes anything the run computes.
    for key in ("allow_config_change", "wandb"):
        old.pop(key, None)
        new.pop(key, None)
    changes = config_changes(old, new)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise UsageError(f"{cfg.out} holds a run with another config ({shown}); give another --out, or pass "
                         "--allow-config-change true to continue that run with this config")


def split_spec(scan: ScanReport, pipe: PipelineConfig, source: Source | None = None) -> SplitSpec:
    """Validation episodes by ``SplitSpec.for_episodes``; for several sources, per source
    (``Source.split``). Without ``source``, ``scan`` is one source's."""
    if source is None:
        return SplitSpec.for_episodes(scan.episode_ids, pipe.val_fraction, pipe.split_seed)
    return source.split(scan, pipe.val_fraction, pipe.split_seed)


def record_input(cfg: PretrainConfig, source: Source, scan: ScanReport, spec: SplitSpec) -> dict[str, Any]:
    """The artifact folder's record of its input (config.json, source_scan.json, split.json) and
    the summary's first entries."""
    out = cfg.out
    storage.makedirs(out)
    storage.write_json(storage.join(out, "config.json"), cfg.to_dict())
    print(f"source {source.name}: {scan.summary()}; {len(spec.val_episodes)} of {len(scan.episode_ids)} "
          "episodes for validation", flush=True)
    # The per-file and per-episode counts are the scan's working figures, not its record.
    scanned = {k: v for k, v in dataclasses.asdict(scan).items() if k not in ("file_triplets", "episode_triplets")}
    summary: dict[str, Any] = {"out": out, "source": {"name": source.name, **{
        k: v for k, v in scanned.items() if k not in ("files", "episode_ids")}}}
    counts = source.source_counts(spec)
    if counts:
        summary["sources"] = scanned["sources"] = counts
        for row in counts:
            print(f"  {row['source']}: {row['train_triplets']} train / {row['val_triplets']} validation "
                  f"triplets ({row['val_episodes']} of {row['episodes']} episodes for validation)"
                  + ("" if row["weight"] is None else f", weight {row['weight']:.3g}"), flush=True)
    storage.write_json(storage.join(out, "source_scan.json"), scanned)
    storage.write_json(storage.join(out, SPLIT_FILE), spec.to_dict())
    return summary


# ---- stage 1 and the probe ----------------------------------------------------------------


def stage1_and_probe(cfg: PretrainConfig, source: Source, scan: ScanReport, spec: SplitSpec,
                     run_config: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 (unless finished), then the probe with its floor and ceiling (unless measured).
    Its wandb run ends with the probe's figures as summary and the latent map and training
    curves as images."""
    out = cfg.out
    summary: dict[str, Any] = {}
    with WandbRun(cfg.wandb, out, "stage1", run_config) as wb:
        ckpt = Checkpoint.finished(storage.join(out, "stage1"))
        trained = ckpt is None
        if trained:
            t0 = time.monotonic()
            ckpt = train_stage1(cfg, source, scan, spec, training_probe(cfg, source, scan, spec), run_config, wb)
            summary["stage1_seconds"] = round(time.monotonic() - t0, 1)
            save_curves(out, read_metrics(out))
        summary["stage1"] = {"checkpoint": ckpt.uri, "steps": ckpt.step, "train_seconds": ckpt.state["train_seconds"]}
        probe_uri = storage.join(out, "probe.json")
        enc = None
        if source.has_actions and cfg.probe.triplets > 0 and not storage.exists(probe_uri):
            probe, enc = measure_probe(cfg, source, scan, spec, ckpt, run_config)
            storage.write_json(probe_uri, probe)
            save_latent_map(out, enc["trained/latent"], enc["action"])
            wb.log_summary(probe, "probe")
            trained = True
        atlas_uri = storage.join(out, "plots", ATLAS_FILE)
        if cfg.probe.triplets > 0 and cfg.model.vq.enabled and not storage.exists(atlas_uri):
            save_atlas(cfg, source, scan, spec, ckpt, enc)
            trained = True
        if trained:
            plots = ("training_curves.png", "latent_map.png", ATLAS_FILE)
            wb.log_images([storage.join(out, "plots", n) for n in plots], step=ckpt.step)
        if storage.exists(probe_uri):
            summary["probe"] = storage.read_json(probe_uri)
        if storage.exists(atlas_uri):
            summary["atlas"] = "plots/" + ATLAS_FILE
    return summary


def training_probe(cfg: PretrainConfig, source: Source, scan: ScanReport, spec: SplitSpec) -> TrainingProbe | None:
    """The small probe stage 1 reports as it trains (``--probe.during-training`` triplets); None
    without labelled validation triplets or with ``--probe.triplets 0``, which turns the probe off
    altogether."""
    n = cfg.probe.during_training if cfg.probe.triplets > 0 else 0
    probe_set = load_probe_set(source, cfg.data, n, scan.files, spec, cfg.model.frame_offset)
    return None if probe_set is None else TrainingProbe(probe_set, cfg.probe)


def stage_datasets(source: Source, pipe: PipelineConfig, files: list[str], spec: SplitSpec):
    """The (training, validation) triplet datasets of a stage trained on the corpus: training
    shuffled and weighted by source, validation in source order."""
    return (triplet_dataset(source, "train", pipe, files, spec, weighted=True),
            triplet_dataset(source, "val", eval_pipeline(pipe), files, spec))


def train_stage1(cfg: PretrainConfig, source: Source, scan: ScanReport, spec: SplitSpec,
                 probe: TrainingProbe | None, run_config: dict[str, Any], wandb: WandbRun | None = None) -> Checkpoint:
    """Fit stage 1 in ``<cfg.out>/stage1`` to ``cfg.stage1``'s budget and return its last
    checkpoint. Training resumes from the latest checkpoint there, a finished one included: a
    run whose step or time budget has since been raised trains on from where it stopped, on the
    same schedule a run given that budget from the start would have followed. ``wandb``: the
    stage's run, which follows the metrics rank 0 writes."""
    return fit_into(cfg.out, stage1_task(cfg, source, scan, spec, probe), cfg.stage1, cfg.data,
                    *stage_datasets(source, cfg.data, scan.files, spec), run_config, wandb=wandb)


def train_ceiling(cfg: PretrainConfig, source: Source, files: list[str], spec: SplitSpec, steps: int,
                  run_config: dict[str, Any]) -> Checkpoint:
    """Train the supervised IDM with stage 1's loop, data, batch size and step count into
    ``<home>/ceiling``, where home is ``--probe.ceiling-from`` or else ``--out`` (skipped when it
    already holds a finished run, resumed when it holds an unfinished one), its metrics in
    ``<home>/ceiling/metrics.jsonl`` and a wandb run of its own; returns its checkpoint. Its lr
    schedule spans ``steps``, where stage 1's spanned its planned steps: the two differ only when
    stage 1 stopped on its time budget."""
    home = cfg.probe.ceiling_from or cfg.out
    ckpt = Checkpoint.finished(storage.join(home, "ceiling"))
    if ckpt is not None:
        return ckpt
    t0 = time.monotonic()
    stage = dataclasses.replace(cfg.stage1, steps=max(1, steps), time_budget_min=0.0)
    with WandbRun(cfg.wandb, home, "ceiling", run_config) as wb:
        ckpt = fit_into(home, SupervisedIDMTask(cfg.model), stage, cfg.data,
                        *stage_datasets(source, cfg.data, files, spec), run_config, wandb=wb,
                        metrics_path=storage.join(home, "ceiling", "metrics.jsonl"))
    print(f"ceiling: supervised IDM trained for {stage.steps} steps in {time.monotonic() - t0:.0f}s", flush=True)
    return ckpt


def train_reference_ceiling(cfg: PretrainConfig) -> Checkpoint | None:
    """The supervised IDM that runs sharing ``cfg.probe.ceiling_from`` reuse (a sweep's trials of
    one corpus), trained there now unless it is already; None for a corpus without actions."""
    source = open_corpus(cfg)
    if source is None:
        raise UsageError("a shared ceiling needs --corpus: collect the corpus first (jobs/collect.py)")
    if not source.has_actions or not cfg.probe.ceiling:
        return None
    init_ray()
    scan = source.scan(on_bad=cfg.data.on_bad_files)
    return train_ceiling(cfg, source, scan.files, split_spec(scan, cfg.data, source), cfg.stage1.steps,
                         cfg.to_dict())


def probe_encoders(cfg: PretrainConfig, source: Source, files: list[str], spec: SplitSpec, ckpt: Checkpoint,
                   run_config: dict[str, Any]) -> dict[str, Encoder]:
    """What the probe reads: the trained IDM of ``ckpt``, the floor (an untrained IDM) and, unless
    ``--probe.ceiling false``, the ceiling, trained first unless it is already."""
    ceiling = train_ceiling(cfg, source, files, spec, ckpt.step, run_config) if cfg.probe.ceiling else None
    return reference_encoders(cfg, load_dynamics(ckpt.uri), ceiling)


def measure_probe(cfg: PretrainConfig, source: Source, scan: ScanReport, spec: SplitSpec, ckpt: Checkpoint,
                  run_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """probe.json's figures for stage 1's checkpoint ``ckpt`` (and, for several sources, per
    source) and what the encoders gave on the probe's triplets (with the atlas's contexts)."""
    encoders = probe_encoders(cfg, source, scan.files, spec, ckpt, run_config)
    probe, enc = probe_references(cfg, source, scan.files, spec, encoders, ckpt.step, ATLAS_CONTEXTS)
    per_source = probe_per_source(cfg, source, scan.files, spec, encoders, ckpt.step)
    if per_source:
        probe["per_source"] = per_source
    return probe, enc


# ---- labelling and stage 2 ------------------------------------------------------------------


def label_latents(cfg: PretrainConfig, source: Source, scan: ScanReport) -> dict[str, Any]:
    """Every triplet of the corpus labelled by stage 1's latest IDM into ``<out>/latents/``."""
    stage1 = storage.join(cfg.out, "stage1")
    ckpt = Checkpoint.latest(stage1)
    if ckpt is None:
        raise MissingPathError(f"{stage1}: no stage-1 checkpoint to label with (run stage1 first)")
    return label_corpus(source, ckpt.uri, cfg.out, cfg.label, files=scan.files)


def train_stage2(cfg: PretrainConfig, run_config: dict[str, Any]) -> dict[str, Any]:
    """Stage 2 on the labelled corpus, unless finished."""
    out = cfg.out
    summary: dict[str, Any] = {}
    ckpt = Checkpoint.finished(storage.join(out, "stage2"))
    if ckpt is None:
        t0 = time.monotonic()
        with WandbRun(cfg.wandb, out, "stage2", run_config) as wb:
            ckpt = fit_into(out, Stage2Task(cfg.model), cfg.stage2, cfg.data, latents_dataset(out, "train", cfg.data),
                            latents_dataset(out, "val", eval_pipeline(cfg.data)), run_config, wandb=wb)
            summary["stage2_seconds"] = round(time.monotonic() - t0, 1)
            wb.log_images([save_curves(out, read_metrics(out))])
    summary["stage2"] = {"checkpoint": ckpt.uri}
    return summary


# ---- plots and report -----------------------------------------------------------------------


def report(out: str, summary: dict[str, Any]) -> None:
    """plots/training_curves.png of every stage so far, and report.md."""
    rows = read_metrics(out)
    if rows:
        save_curves(out, rows)
    write_report(out, summary, rows)


def save_curves(out: str, rows: list[dict[str, Any]]) -> str:
    uri = storage.join(out, "plots", "training_curves.png")
    plot_training_curves(rows, uri)
    return uri


def save_latent_map(out: str, latents, actions) -> str:
    uri = storage.join(out, "plots", "latent_map.png")
    plot_latent_map(latents, actions, uri, title="stage-1 latent actions on held-out triplets (PCA)")
    return uri


def save_atlas(cfg: PretrainConfig, source: Source, scan: ScanReport, spec: SplitSpec, ckpt: Checkpoint,
               enc: dict[str, Any] | None) -> None:
    """plots/atlas.png of stage 1's checkpoint on the probe's held-out triplets ``enc`` or, without
    them (a corpus without actions), on the held-out triplets read for it now."""
    run = load_run(ckpt.uri)
    if enc is None:
        enc = held_out_codes(cfg, source, scan.files, spec, run.dynamics)
    draw_atlas(storage.join(cfg.out, "plots"), run, enc)


def write_report(out: str, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    storage.write_bytes(storage.join(out, "report.md"), render_pretrain_report(summary, rows).encode())
