"""Stages 1 and 2 end to end: corpus -> stage 1 -> probe report -> labelling -> stage 2 -> plots.

Everything lands in one artifact folder (local path or URI)::

    config.json  metrics.jsonl  source_scan.json  stage1/  ceiling/  probe.json  latents/  stage2/
    plots/training_curves.png  plots/latent_map.png  report.md

Each stage is skipped when the folder already holds its finished result and resumed from its
latest checkpoint when it holds an unfinished one, so running the job again continues it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any

import numpy as np
import torch

from lapo_ray import MissingPathError, UsageError, storage
from lapo_ray.config import PipelineConfig, PretrainConfig
from lapo_ray.data.mixture import open_corpus_sources
from lapo_ray.data.sources import ScanReport, Source
from lapo_ray.data.triplets import SplitSpec, iter_batches, triplet_dataset
from lapo_ray.runtime import init_ray
from lapo_ray.train.checkpoint import latest_checkpoint, load_dynamics
from lapo_ray.train.labelling import SPLIT_FILE, label_corpus, latents_dataset
from lapo_ray.train.metrics import MetricsSink, WandbRun, read_metrics
from lapo_ray.train.stages import LabelSet, ProbeSet, Stage1Task, Stage2Task, SupervisedIDMTask
from lapo_ray.train.trainer import fit_stage


def _eval_pipeline(pipe: PipelineConfig) -> PipelineConfig:
    """Same split, source order, no shuffling: for validation and probe sets."""
    return dataclasses.replace(pipe, global_shuffle="none", local_shuffle_buffer=0)


def _labelled_batches(source: Source, pipe: PipelineConfig, files: list[str], spec: SplitSpec, offset: int,
                      split: str = "val"):
    """Labelled triplets (frame offset ``offset``) of ``split``'s episodes, in source order."""
    ds = triplet_dataset(source, split, _eval_pipeline(pipe), files, spec)
    for b in iter_batches(ds, source.frame_shape, 512, _eval_pipeline(pipe), offset=offset):
        keep = b["action"] >= 0
        if keep.any():
            yield {k: b[k][keep] for k in ("frames", "action", "episode_id", "step")}


def load_probe_set(source: Source, pipe: PipelineConfig, n: int, files: list[str], spec: SplitSpec,
                   offset: int = 1) -> ProbeSet | None:
    """Up to ``n`` labelled validation triplets, frames included (the probe during stage 1)."""
    from lapo_ray.evaluation.probe import probe_halves

    if not source.has_actions or n <= 0:
        return None
    parts, have = [], 0
    for b in _labelled_batches(source, pipe, files, spec, offset):
        parts.append(b)
        have += len(b["action"])
        if have >= n:
            break
    if have < 32:
        print(f"probe: only {have} labelled validation triplets; skipping the probe", flush=True)
        return None
    cat = {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
    return ProbeSet(cat["frames"], cat["action"].astype(np.int64), probe_halves(cat["episode_id"]),
                    cat["episode_id"].astype(np.int64))


@torch.no_grad()
def encode_probe_triplets(source: Source, pipe: PipelineConfig, n: int, files: list[str], spec: SplitSpec,
                          encoders: dict[str, Any], offset: int = 1) -> dict[str, np.ndarray]:
    """Up to ``n`` labelled validation triplets, streamed through ``encoders`` ({name: frames ->
    {key: tensor}}) so only their outputs are kept: 20k triplets of 64x64 frames are 0.7 GB.
    Returns ``action``, ``episode_id`` and ``<name>/<key>`` arrays."""
    out: dict[str, list[np.ndarray]] = {"action": [], "episode_id": []}
    have = 0
    for b in _labelled_batches(source, pipe, files, spec, offset):
        take = min(len(b["action"]), n - have)
        frames = torch.from_numpy(np.ascontiguousarray(b["frames"][:take]))
        out["action"].append(b["action"][:take].astype(np.int64))
        out["episode_id"].append(b["episode_id"][:take].astype(np.int64))
        for name, fn in encoders.items():
            for key, value in fn(frames).items():
                out.setdefault(f"{name}/{key}", []).append(value.float().numpy() if value.is_floating_point()
                                                          else value.numpy())
        have += take
        if have >= n:
            break
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _stage_done(stage_uri: str) -> str | None:
    ckpt = latest_checkpoint(stage_uri)
    if ckpt is None:
        return None
    state = json.loads(storage.read_bytes(f"{ckpt}/state.json"))
    return ckpt if state.get("done") else None


def _save_png(fig_fn, out_uri: str, name: str, *args) -> str:
    uri = storage.join(out_uri, "plots", name)
    fig_fn(*args, uri)
    return uri


def open_corpus(cfg: PretrainConfig) -> Source | None:
    """The source to train on, opened and checked against the model before any Ray work: the
    path exists, its kind is known and its frames have the model's shape. None when the default
    corpus still has to be collected. Several sources (``--corpus A=0.7,B=0.3``) are one
    ``MultiSource`` (``data.mixture``)."""
    corpus = cfg.corpus or cfg.collect.out
    if not cfg.corpus and not storage.exists(storage.join(corpus, "manifest.json")):
        return None
    source = open_corpus_sources(corpus, frame_size=(cfg.model.frame_size, cfg.model.frame_size))
    check_frame_shape(source, cfg)
    return source


def check_frame_shape(source: Source, cfg: PretrainConfig) -> None:
    want = (cfg.model.frame_size, cfg.model.frame_size, cfg.model.channels)
    if tuple(source.frame_shape) != want:
        raise UsageError(f"{source.name}: frames are {tuple(source.frame_shape)} (H, W, C) but the model expects "
                         f"{want} (--model.frame-size {cfg.model.frame_size}, --model.channels {cfg.model.channels})")


def check_artifact_folder(cfg: PretrainConfig) -> None:
    """Refuse to continue a run in ``cfg.out`` under another config unless asked: a typo in
    --out would otherwise mix two experiments into one folder."""
    from lapo_ray.config import config_changes, config_from_dict

    uri = storage.join(cfg.out, "config.json")
    if cfg.allow_config_change or not storage.exists(uri):
        return
    old, new = storage.read_json(uri), cfg.to_dict()
    if not isinstance(old, dict):
        raise UsageError(f"{uri}: not a lapo_ray config")
    try:
        # A field the old config lacks is an option added since, at its default: the default
        # keeps the behaviour the run was made with, so it is no change.
        old = config_from_dict(PretrainConfig, old).to_dict()
    except (ValueError, TypeError):
        pass  # keys this version does not know: compare as written, and name them below
    old.pop("allow_config_change", None)
    new.pop("allow_config_change")
    # Where the logs go (wandb's mode, project, group) changes nothing the run computes.
    old.pop("wandb", None)
    new.pop("wandb", None)
    changes = config_changes(old, new)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise UsageError(f"{cfg.out} holds a run with another config ({shown}); give another --out, or pass "
                         "--allow-config-change true to continue that run with this config")


# Every training worker holds the labelled triplets (LabelSet) in memory, and on GPUs a second copy.
LABEL_SET_MAX_BYTES = 2 * 2**30


def load_label_set(source: Source, pipe: PipelineConfig, files: list[str], spec: SplitSpec, fraction: float,
                   offset: int = 1, seed: int = 0) -> LabelSet:
    """The training triplets that ``recipes.triplet_hash_np`` marks labelled (about ``fraction`` of
    them), read once in source order; ``seed`` seeds the set's draws."""
    from lapo_ray.train.recipes import triplet_hash_np

    if not source.has_actions:
        raise UsageError(f"--stage1.action-labels: the corpus {source.name} has no actions to label with")
    t0 = time.monotonic()
    frames, actions = [], []
    for b in _labelled_batches(source, pipe, files, spec, offset, split="train"):
        keep = triplet_hash_np(b["episode_id"], b["step"]) < fraction
        if keep.any():
            frames.append(b["frames"][keep])
            actions.append(b["action"][keep].astype(np.int64))
    if not actions:
        raise UsageError(f"--stage1.action-labels: no labelled training triplet in {source.name} "
                         f"(hash fraction {fraction:.3g})")
    labels = LabelSet(np.concatenate(frames), np.concatenate(actions), seed=seed)
    print(f"stage 1: {len(labels.actions)} labelled training triplets read in {time.monotonic() - t0:.0f}s",
          flush=True)
    return labels


def stage1_task(cfg: PretrainConfig, source: Source, scan, spec: SplitSpec, probe: ProbeSet | None) -> Stage1Task:
    """Stage 1's task with its recipe options; the labelled share is sized from the training
    split's triplet count (episodes are about equally long, so the episode share stands in)."""
    from lapo_ray.train.recipes import label_fraction

    labels = None
    if cfg.stage1.action_labels > 0:
        need = cfg.stage1.action_labels * 3 * int(np.prod(source.frame_shape))
        if need > LABEL_SET_MAX_BYTES:
            raise UsageError(
                f"--stage1.action-labels {cfg.stage1.action_labels}: the labelled triplets would take "
                f"{need / 2**30:.1f} GiB in every training worker's memory (at most "
                f"{LABEL_SET_MAX_BYTES / 2**30:.0f} GiB); LAOM's few labels are a few thousand")
        n_eps = max(1, len(scan.episode_ids))
        train_share = 1.0 - (len(spec.val_episodes or ()) / n_eps)
        frac = label_fraction(cfg.stage1.action_labels, int(scan.triplets * train_share))
        labels = load_label_set(source, cfg.data, scan.files, spec, frac, cfg.model.frame_offset, cfg.stage1.seed)
    return Stage1Task(cfg.model, cfg.probe, probe, recipe=cfg.stage1, label_set=labels)


def train_stage1(cfg: PretrainConfig, source: Source, scan, spec: SplitSpec, probe: ProbeSet | None,
                 run_config: dict[str, Any], wandb: WandbRun | None = None) -> str:
    """Fit stage 1 in ``<cfg.out>/stage1`` to ``cfg.stage1``'s budget and return its last
    checkpoint. Training resumes from the latest checkpoint there, a finished one included: a
    run whose step or time budget has since been raised trains on from where it stopped, on the
    same schedule a run given that budget from the start would have followed. ``wandb``: the
    stage's run, which follows the metrics rank 0 writes."""
    sink = MetricsSink(cfg.out, "stage1")
    with wandb.following(sink.path) if wandb is not None else contextlib.nullcontext():
        result = fit_stage(
            stage1_task(cfg, source, scan, spec, probe), cfg.stage1, cfg.data,
            triplet_dataset(source, "train", cfg.data, scan.files, spec, weighted=True),
            triplet_dataset(source, "val", _eval_pipeline(cfg.data), scan.files, spec),
            cfg.out, run_config, sink,
        )
    if result.error:
        raise RuntimeError(f"stage 1 failed: {result.error}")
    return latest_checkpoint(storage.join(cfg.out, "stage1"))


def split_spec(scan: ScanReport, pipe: PipelineConfig, source: Source | None = None) -> SplitSpec:
    """Validation episodes by ``SplitSpec.for_episodes``; for several sources, per source
    (``Source.split``). Without ``source``, ``scan`` is one source's."""
    if source is None:
        return SplitSpec.for_episodes(scan.episode_ids, pipe.val_fraction, pipe.split_seed)
    return source.split(scan, pipe.val_fraction, pipe.split_seed)


def train_ceiling(cfg: PretrainConfig, source: Source, files: list[str], spec: SplitSpec, steps: int,
                  run_config: dict[str, Any]) -> str:
    """Train the supervised IDM with stage 1's loop, data, batch size and step count into
    ``<home>/ceiling``, where home is ``--probe.ceiling-from`` or else ``--out`` (skipped when it
    already holds a finished run, resumed when it holds an unfinished one), its metrics in
    ``<home>/ceiling/metrics.jsonl`` and a wandb run of its own; returns its checkpoint. Its lr
    schedule spans ``steps``, where stage 1's spanned its planned steps: the two differ only when
    stage 1 stopped on its time budget."""
    home = cfg.probe.ceiling_from or cfg.out
    uri = storage.join(home, "ceiling")
    ckpt = _stage_done(uri)
    if ckpt is None:
        t0 = time.monotonic()
        stage = dataclasses.replace(cfg.stage1, steps=max(1, steps), time_budget_min=0.0)
        sink = MetricsSink(home, "ceiling", path=storage.join(uri, "metrics.jsonl"))
        with WandbRun(cfg.wandb, home, "ceiling", run_config) as wb, wb.following(sink.path):
            result = fit_stage(SupervisedIDMTask(cfg.model), stage, cfg.data,
                               triplet_dataset(source, "train", cfg.data, files, spec, weighted=True),
                               triplet_dataset(source, "val", _eval_pipeline(cfg.data), files, spec),
                               home, run_config, sink)
        if result.error:
            raise RuntimeError(f"ceiling (supervised IDM) failed: {result.error}")
        ckpt = latest_checkpoint(uri)
        print(f"ceiling: supervised IDM trained for {stage.steps} steps in {time.monotonic() - t0:.0f}s", flush=True)
    return ckpt


def train_reference_ceiling(cfg: PretrainConfig) -> str | None:
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


def probe_references(cfg: PretrainConfig, source: Source, files: list[str], spec: SplitSpec, checkpoint: str,
                     steps_done: int,
                     run_config: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """probe.json: the trained IDM's probe against majority, floor (untrained IDM), ceiling (the
    same probe on a supervised IDM's latent layer) and the direct supervised classifier, with
    code-action NMI and codebook perplexity for the trained and untrained IDM. Also returns what
    the encoders gave on the probe's triplets (see ``encode_probe_triplets``)."""
    from lapo_ray.evaluation.ceiling import classifier_accuracy
    from lapo_ray.evaluation.probe import (
        code_action_nmi,
        codebook_perplexity,
        majority_rate,
        probe_accuracy,
        probe_halves,
        probe_report,
    )
    from lapo_ray.models import LatentDynamics
    from lapo_ray.train.checkpoint import load_supervised_idm

    trained = load_dynamics(checkpoint)
    torch.manual_seed(cfg.stage1.seed)  # the floor: the very initialisation stage 1 started from
    untrained = LatentDynamics(cfg.model).eval()

    def idm(model):
        return lambda f: dict(zip(("latent", "codes"), model.encode(f)))

    encoders = {"trained": idm(trained), "untrained": idm(untrained)}
    if cfg.probe.ceiling:
        sup = load_supervised_idm(train_ceiling(cfg, source, files, spec, steps_done, run_config or cfg.to_dict()))
        encoders["supervised"] = lambda f: {"latent": sup.features(f), "logits": sup.head(sup.features(f))}
    t0 = time.monotonic()
    enc = encode_probe_triplets(source, cfg.data, cfg.probe.triplets, files, spec, encoders, cfg.model.frame_offset)
    actions, episodes = enc["action"], enc["episode_id"]
    if len(actions) < 32:
        raise UsageError(f"probe: only {len(actions)} labelled validation triplets")
    test = probe_halves(episodes)
    acc = {name: probe_accuracy(enc[f"{name}/latent"], actions, test, cfg.probe, episode_ids=episodes)
           for name in encoders}
    # Without VQ (--model.vq.enabled false) there are no codes: NMI and perplexity are n/a.
    code_names = ("trained", "untrained") if cfg.model.vq.enabled else ()
    codes = {name: {"nmi": code_action_nmi(enc[f"{name}/codes"], actions),
                    "perplexity": codebook_perplexity(enc[f"{name}/codes"])} for name in code_names}
    for name in codes:
        # Per codebook too: the whole tuple can have nearly as many values as there are triplets
        # (16^4 in the cpu preset), which leaves the chance-corrected estimate little room.
        cb = enc[f"{name}/codes"]
        codes[name]["nmi"]["per_codebook"] = [code_action_nmi(cb[:, c], actions)["nmi"] for c in range(cb.shape[1])]
    direct = classifier_accuracy(enc["supervised/logits"], actions, test) if "supervised/logits" in enc else None
    report = probe_report(acc["trained"], acc["untrained"], acc.get("supervised"), majority_rate(actions, test),
                          direct_classifier=direct, codes=codes)
    report["stage1_steps"] = steps_done
    report["probe_set"] = ("validation episodes, split in halves by episode; the probe's epoch is picked on "
                           f"{cfg.probe.val_fraction:.0%} of the training half's episodes")
    print(f"probe: {len(actions)} triplets, {time.monotonic() - t0:.0f}s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report.items() if isinstance(v, float)), flush=True)
    return report, enc


def probe_per_source(cfg: PretrainConfig, source: Source, files: list[str], spec: SplitSpec, checkpoint: str,
                     steps_done: int, run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The probe of ``probe_references`` on each source's own validation episodes (the ceiling is
    the one trained on all of them), keyed by the source as ``--corpus`` names it; empty for one
    source."""
    out: dict[str, Any] = {}
    for part in source.source_parts(files, spec):
        if not part.source.has_actions:
            out[part.label] = {"skipped": "no actions"}
            continue
        try:
            out[part.label], _ = probe_references(cfg, part.source, part.files, part.spec, checkpoint, steps_done,
                                                  run_config)
        except ValueError as e:  # too few labelled validation triplets in this source
            out[part.label] = {"skipped": str(e)}
    return out


def run_pretrain(cfg: PretrainConfig, policy_factories=None) -> dict[str, Any]:
    """Run the stages in ``cfg.stages`` and return a summary (also written to report.md).
    ``policy_factories`` go to the default corpus's collection (see ``data.collect.collect``)."""
    source, scan, spec = _checked_input(cfg, policy_factories)
    # Only now, with every input checked, does anything go into the artifact folder.
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

    run_config = cfg.to_dict()
    stages = cfg.stage_list()
    if "stage1" in stages:
        summary.update(_stage1_and_probe(cfg, source, scan, spec, run_config))
    if "label" in stages:
        ckpt = latest_checkpoint(storage.join(out, "stage1"))
        if ckpt is None:
            raise MissingPathError(f"{storage.join(out, 'stage1')}: no stage-1 checkpoint to label with "
                                    "(run stage1 first)")
        summary["latents"] = label_corpus(source, ckpt, out, cfg.label, files=scan.files)
    if "stage2" in stages:
        summary.update(_stage2(cfg, run_config))

    rows = read_metrics(out)
    if rows:
        _save_png(_curves, out, "training_curves.png", rows)
    write_report(out, summary, rows)
    return summary


def _checked_input(cfg: PretrainConfig, policy_factories) -> tuple[Source, ScanReport, SplitSpec]:
    """The corpus (collected first when none is given), every file of it scanned, its split, and
    the artifact folder checked against the config: whatever fails, fails before a write."""
    source = open_corpus(cfg)
    if source is None:
        check_artifact_folder(cfg)  # collecting takes minutes: refuse a mismatched --out before it
    init_ray()
    if source is None:
        from lapo_ray.data.collect import collect

        print(f"no --corpus given: collecting the default corpus into {cfg.collect.out}", flush=True)
        collect(cfg.collect, policy_factories=policy_factories)
        source = open_corpus(cfg)
    scan = source.scan(on_bad=cfg.data.on_bad_files)
    spec = split_spec(scan, cfg.data, source)
    check_artifact_folder(cfg)
    return source, scan, spec


def _stage1_and_probe(cfg: PretrainConfig, source: Source, scan: ScanReport, spec: SplitSpec,
                      run_config: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 (unless finished), then the probe with its floor and ceiling (unless measured).
    Its wandb run ends with the probe's figures as summary and the latent map and training
    curves as images."""
    out = cfg.out
    summary: dict[str, Any] = {}
    # --probe.triplets 0 turns the probe off altogether, during stage 1 too.
    probe = load_probe_set(source, cfg.data, cfg.probe.during_training if cfg.probe.triplets > 0 else 0,
                           scan.files, spec, cfg.model.frame_offset)
    with WandbRun(cfg.wandb, out, "stage1", run_config) as wb:
        ckpt = _stage_done(storage.join(out, "stage1"))
        trained = ckpt is None
        if trained:
            t0 = time.monotonic()
            ckpt = train_stage1(cfg, source, scan, spec, probe, run_config, wandb=wb)
            summary["stage1_seconds"] = round(time.monotonic() - t0, 1)
            _save_png(_curves, out, "training_curves.png", read_metrics(out))
        state = json.loads(storage.read_bytes(f"{ckpt}/state.json"))
        summary["stage1"] = {"checkpoint": ckpt, "steps": state["step"], "train_seconds": state["train_seconds"]}
        probe_uri = storage.join(out, "probe.json")
        if source.has_actions and cfg.probe.triplets > 0 and not storage.exists(probe_uri):
            report, enc = probe_references(cfg, source, scan.files, spec, ckpt, state["step"], run_config)
            per_source = probe_per_source(cfg, source, scan.files, spec, ckpt, state["step"], run_config)
            if per_source:
                report["per_source"] = per_source
            storage.write_json(probe_uri, report)
            _save_png(_latent_map, out, "latent_map.png", enc["trained/latent"], enc["action"])
            wb.log_summary(report, "probe")
            trained = True
        if trained:
            wb.log_images([storage.join(out, "plots", n) for n in ("training_curves.png", "latent_map.png")],
                          step=state["step"])
        if storage.exists(probe_uri):
            summary["probe"] = storage.read_json(probe_uri)
    return summary


def _stage2(cfg: PretrainConfig, run_config: dict[str, Any]) -> dict[str, Any]:
    """Stage 2 on the labelled corpus, unless finished."""
    out = cfg.out
    summary: dict[str, Any] = {}
    stage2_uri = storage.join(out, "stage2")
    ckpt = _stage_done(stage2_uri)
    if ckpt is None:
        t0 = time.monotonic()
        sink = MetricsSink(out, "stage2")
        with WandbRun(cfg.wandb, out, "stage2", run_config) as wb:
            with wb.following(sink.path):
                result = fit_stage(
                    Stage2Task(cfg.model), cfg.stage2, cfg.data,
                    latents_dataset(out, "train", cfg.data), latents_dataset(out, "val", _eval_pipeline(cfg.data)),
                    out, run_config, sink,
                )
            if result.error:
                raise RuntimeError(f"stage 2 failed: {result.error}")
            summary["stage2_seconds"] = round(time.monotonic() - t0, 1)
            wb.log_images([_save_png(_curves, out, "training_curves.png", read_metrics(out))])
        ckpt = latest_checkpoint(stage2_uri)
    summary["stage2"] = {"checkpoint": ckpt}
    return summary


def _curves(rows, path):
    from lapo_ray.evaluation.plots import plot_training_curves

    plot_training_curves(rows, path)


def _latent_map(latents, actions, path):
    from lapo_ray.evaluation.plots import plot_latent_map

    plot_latent_map(latents, actions, path, title="stage-1 latent actions on held-out triplets (PCA)")


def write_report(out: str, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from lapo_ray.evaluation.reports import render_pretrain_report

    storage.write_bytes(storage.join(out, "report.md"), render_pretrain_report(summary, rows).encode())
