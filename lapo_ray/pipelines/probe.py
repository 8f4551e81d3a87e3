"""Assess any stage-1 checkpoint on any corpus (``jobs/probe.py``).

``--checkpoint`` is a pretrain run folder, one stage-1 checkpoint or an export (``train.run.load_run``);
``--corpus`` anything pretraining reads, one source or several. The corpus is split and read with
the checkpoint's own data settings (its run's ``--data.val-fraction`` and ``--data.split-seed``), so
on the run's own corpus the held-out episodes are the ones the run held out; the probe reads only
those. With true actions: the probe against the majority action, the floor (the untrained IDM
stage 1 started from) and the ceiling (a supervised IDM trained as pretraining trains it, into
``<out>/ceiling``, or a run's finished one reused with ``--ceiling-from``), bits, code-action
NMI and the table of codes against actions. In every case: each codebook's use, the latent maps and
the atlas (``pipelines.assessment``, which pretraining draws its own with).

Everything is checked before anything is written: the checkpoint, the corpus, the frame shape
the model reads, the reused ceiling and ``--out`` (new, or an earlier probe's, never another
job's folder). ``report.md``, ``probe.json`` and ``plots/`` are made in a local folder and moved
into ``--out`` at the end, ``plots/`` whole and each file atomically, report.md last.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from lapo_ray import MissingPathError, UsageError, storage
from lapo_ray.config import PretrainConfig, WandbConfig, config_from_dict
from lapo_ray.config.probe import ProbeJobConfig
from lapo_ray.data.mixture import open_corpus_sources
from lapo_ray.data.sources import ScanReport, Source
from lapo_ray.data.splits import SplitSpec
from lapo_ray.evaluation.latents import code_action_table, code_label, codebook_usage, ranked_tuples
from lapo_ray.evaluation.plots import plot_code_action_table, plot_latent_map, plot_latent_map_by_code
from lapo_ray.evaluation.references import probe_per_source, probe_references
from lapo_ray.evaluation.reports import render_probe_report
from lapo_ray.pipelines.assessment import draw_atlas, has_codes, held_out_codes, reference_encoders
from lapo_ray.pipelines.pretrain import check_frame_shape, split_spec, train_ceiling
from lapo_ray.runtime import init_ray
from lapo_ray.train.checkpoint import Checkpoint
from lapo_ray.train.run import Run, load_run

JOB_FILE, PROBE_FILE, REPORT_FILE = "probe_job.json", "probe.json", "report.md"
CODES_SHOWN = 12  # code tuples with a row of their own in the table of codes against actions
MIN_HELD_OUT = 32  # as few as the probe itself takes (evaluation.references)


@dataclass
class ProbeInput:
    """The job's input, checked: the trained run, the config it probes under (the checkpoint's,
    with this job's corpus, out and probe settings), the corpus and a reused ceiling."""

    run: Run
    cfg: PretrainConfig
    source: Source
    ceiling: Checkpoint | None


def run_probe(cfg: ProbeJobConfig) -> dict[str, Any]:
    """Probe ``cfg.checkpoint`` on ``cfg.corpus`` into ``cfg.out``; returns probe.json's figures."""
    inp = checked_input(cfg)
    init_ray()
    t0 = time.monotonic()
    scan = inp.source.scan(on_bad=cfg.on_bad_files)
    spec = split_spec(scan, inp.cfg.data, inp.source)
    check_held_out(inp.source, scan, spec)
    print(f"probe: {inp.run.uri} on {inp.source.name}: {scan.summary()}; {len(spec.val_episodes)} of "
          f"{len(scan.episode_ids)} episodes held out", flush=True)
    storage.makedirs(cfg.out)
    storage.write_json(storage.join(cfg.out, JOB_FILE), {"config": cfg.to_dict(), "checkpoint": inp.run.uri})
    figures, enc = measure(cfg, inp, scan, spec)
    figures["seconds"] = round(time.monotonic() - t0, 1)
    write_outputs(cfg, inp, figures, enc)
    print(f"probe: report.md, probe.json and plots/ in {cfg.out}", flush=True)
    return figures


# ---- input: checked before anything is written -----------------------------------------------


def checked_input(cfg: ProbeJobConfig) -> ProbeInput:
    """Every input, checked without Ray and before any write: ``--out`` first, as the cheapest."""
    check_out(cfg.out)
    run = open_run(cfg.checkpoint)
    pcfg = probe_config(cfg, run)
    model = run.model_config
    source = open_corpus_sources(cfg.corpus, frame_size=(model.frame_size, model.frame_size))
    check_frame_shape(source, model, f" of the checkpoint {run.uri}")
    ceiling = None
    if source.has_actions and cfg.probe.ceiling and cfg.ceiling_from:
        ceiling = reused_ceiling(cfg.ceiling_from, source)
    return ProbeInput(run, pcfg, source, ceiling)


def check_out(out: str) -> None:
    """``--out`` is new, empty or an earlier probe's: a probe never writes into a run's folder."""
    if storage.exists(out) and storage.list_files_below(out, 3) and not storage.exists(storage.join(out, JOB_FILE)):
        raise UsageError(f"--out {out}: exists and holds something other than a probe's output; name a new folder")


def open_run(uri: str) -> Run:
    """``load_run`` with its one-line errors naming the flag."""
    try:
        return load_run(uri)
    except UsageError as e:
        raise type(e)(f"--checkpoint {e}") from e


def probe_config(cfg: ProbeJobConfig, run: Run) -> PretrainConfig:
    """The checkpoint's run config, with this job's corpus, out, probe and bad-file settings and no
    wandb: what the shared steps (the split, the probe, the ceiling) read."""
    try:
        pcfg = config_from_dict(PretrainConfig, run.config)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--checkpoint {run.uri}: its config.json is not a pretraining config this version of "
                         f"lapo_ray reads ({e})") from e
    return dataclasses.replace(pcfg, out=cfg.out, corpus=cfg.corpus,
                               probe=dataclasses.replace(cfg.probe, ceiling_from=""),
                               data=dataclasses.replace(pcfg.data, on_bad_files=cfg.on_bad_files),
                               wandb=WandbConfig(mode="disabled"))


def reused_ceiling(uri: str, source: Source) -> Checkpoint:
    """The finished ceiling ``--ceiling-from`` names: a run folder holding ``ceiling/`` or that
    ``ceiling/`` folder itself. Never trained there: a probe writes only into its own ``--out``."""
    if not storage.exists(uri):
        raise MissingPathError(f"--ceiling-from {uri}: no such folder")
    ckpt = Checkpoint.finished(storage.join(uri, "ceiling")) or Checkpoint.finished(uri)
    if ckpt is None or ckpt.stage not in (None, "ceiling"):
        raise UsageError(f"--ceiling-from {uri}: no finished ceiling in it (neither ceiling/checkpoint_* nor "
                         "checkpoint_* of a finished supervised IDM); leave the flag out to train one into --out")
    check_frame_shape(source, ckpt.model_config(), f" of the ceiling {ckpt.uri}")
    return ckpt


def check_held_out(source: Source, scan: ScanReport, spec: SplitSpec) -> None:
    """Refuse, before any write, a corpus whose held-out episodes are too short to probe."""
    if not scan.files:
        raise UsageError(f"{source.name}: no usable file to probe on")
    val = set(spec.val_episodes or ())
    held_out = sum(n for e, n in zip(scan.episode_ids, scan.episode_triplets) if e in val)
    if held_out < MIN_HELD_OUT:
        raise UsageError(f"{source.name}: only {held_out} triplets in its {len(val)} held-out episode(s); the probe "
                         f"needs at least {MIN_HELD_OUT}")


# ---- the figures --------------------------------------------------------------------------------


def measure(cfg: ProbeJobConfig, inp: ProbeInput, scan: ScanReport,
            spec: SplitSpec) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """probe.json's figures and the encoders' outputs on the held-out triplets."""
    pcfg, run, source = inp.cfg, inp.run, inp.source
    figures: dict[str, Any] = {"checkpoint": run.uri, "stage1_steps": run.stage1_steps, "corpus": cfg.corpus,
                               "source": {"name": source.name, "frames": scan.frames, "episodes": scan.episodes,
                                          "triplets": scan.triplets, "held_out_episodes": len(spec.val_episodes)}}
    if source.has_actions:
        ceiling = inp.ceiling
        if ceiling is None and cfg.probe.ceiling:
            ceiling = train_ceiling(pcfg, source, scan.files, spec, run.stage1_steps or pcfg.stage1.steps,
                                    pcfg.to_dict())
        encoders = reference_encoders(pcfg, run.dynamics, ceiling)
        probe, enc = probe_references(pcfg, source, scan.files, spec, encoders, run.stage1_steps, cfg.atlas_contexts)
        figures.update(probe, ceiling=None if ceiling is None else ceiling.uri)
        per_source = probe_per_source(pcfg, source, scan.files, spec, encoders, run.stage1_steps)
        if per_source:
            figures["per_source"] = per_source
    else:
        enc = held_out_codes(pcfg, source, scan.files, spec, run.dynamics, cfg.atlas_contexts)
        if len(enc.get("action", ())) == 0:
            raise UsageError(f"{source.name}: no triplets in its held-out episodes")
    figures["held_out_triplets"] = int(len(enc["action"]))
    if has_codes(run, enc):
        figures["codebooks"] = codebook_usage(enc["trained/codes"], run.model_config.vq.num_embs)
        if source.has_actions:
            figures["code_action_table"] = code_action_table(enc["trained/codes"], enc["action"], CODES_SHOWN)
    return figures, enc


# ---- the outputs --------------------------------------------------------------------------------


def write_outputs(cfg: ProbeJobConfig, inp: ProbeInput, figures: dict[str, Any], enc: dict[str, np.ndarray]) -> None:
    """plots/, probe.json and report.md, made locally and then moved into ``cfg.out``."""
    with tempfile.TemporaryDirectory() as tmp:
        plots = os.path.join(tmp, "plots")
        os.makedirs(plots)
        draw_plots(cfg, inp, figures, enc, plots)
        storage.upload_dir(plots, storage.join(cfg.out, "plots"))
    storage.write_json(storage.join(cfg.out, PROBE_FILE), figures)
    storage.write_bytes(storage.join(cfg.out, REPORT_FILE), render_probe_report(figures).encode())


def draw_plots(cfg: ProbeJobConfig, inp: ProbeInput, figures: dict[str, Any], enc: dict[str, np.ndarray],
               plots: str) -> None:
    """The latent maps, the table of codes against actions and the atlas; the atlas's figures
    go into ``figures``."""
    latents, actions = enc["trained/latent"], enc["action"]
    if inp.source.has_actions:
        plot_latent_map(latents, actions, os.path.join(plots, "latent_map.png"),
                        title="latent actions on held-out triplets (PCA), by true action")
    if "codebooks" not in figures:
        return
    uniq, _, rank = ranked_tuples(enc["trained/codes"])
    plot_latent_map_by_code(latents, rank, [code_label(u) for u in uniq[:10]],
                            os.path.join(plots, "latent_map_codes.png"),
                            title="latent actions on held-out triplets (PCA), by code tuple")
    if "code_action_table" in figures:
        plot_code_action_table(figures["code_action_table"], os.path.join(plots, "code_action.png"))
    atlas = draw_atlas(plots, inp.run, enc, cfg.atlas_rows)
    if atlas is not None:
        figures["atlas"] = atlas
