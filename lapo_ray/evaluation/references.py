"""The probe on a corpus's held-out triplets: a trained IDM against its references.

The probe's data is read here (``load_probe_set`` for the small set stage 1 probes while it
trains, ``encode_probe_triplets`` for the full probe, ``encode_held_out`` for every held-out
triplet of a corpus with or without actions), and ``probe_references`` measures probe.json:
the trained IDM's probe against the majority rate, the floor (an untrained IDM) and the ceiling (a
supervised IDM's latent layer) with the direct supervised classifier beside it, and the codes'
NMI and perplexity. The models come in as encoders, already loaded: training the ceiling is the
pretrain pipeline's step (``pipelines.pretrain.train_ceiling``), since this room sits below the
stage loop.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from lapo_ray import UsageError
from lapo_ray.config import PipelineConfig, PretrainConfig, ProbeConfig
from lapo_ray.data.sources import Source
from lapo_ray.data.splits import SplitSpec
from lapo_ray.data.triplets import batches_with_actions, eval_pipeline, iter_batches, triplet_dataset
from lapo_ray.evaluation.latents import ContextSample
from lapo_ray.evaluation.probe import (
    ProbeSet,
    classifier_accuracy,
    code_action_nmi,
    codebook_perplexity,
    majority_rate,
    probe_accuracy,
    probe_halves,
    probe_report,
)

# frames uint8 (B, 3, H, W, C) -> {"latent": ..., and "codes" or "logits"}: one model read by the probe.
Encoder = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def load_probe_set(source: Source, pipe: PipelineConfig, n: int, files: list[str], spec: SplitSpec,
                   offset: int = 1) -> ProbeSet | None:
    """Up to ``n`` labelled validation triplets, frames included (the probe during stage 1)."""
    if not source.has_actions or n <= 0:
        return None
    parts, have = [], 0
    for b in batches_with_actions(source, pipe, files, spec, offset):
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


def encode_probe_triplets(source: Source, pipe: PipelineConfig, n: int, files: list[str], spec: SplitSpec,
                          encoders: dict[str, Encoder], offset: int = 1, contexts: int = 0) -> dict[str, np.ndarray]:
    """Up to ``n`` labelled validation triplets, streamed through ``encoders`` so only their
    outputs are kept: 20k triplets of 64x64 frames are 0.7 GB. Returns ``action``,
    ``episode_id`` and ``<name>/<key>`` arrays (and ``encode_triplets``' context sample)."""
    return encode_triplets(batches_with_actions(source, pipe, files, spec, offset), n, encoders, contexts)


def encode_held_out(source: Source, pipe: PipelineConfig, n: int, files: list[str], spec: SplitSpec,
                    encoders: dict[str, Encoder], offset: int = 1, contexts: int = 0) -> dict[str, np.ndarray]:
    """As ``encode_probe_triplets``, over every validation triplet, with a true action or not
    (``action`` -1 where unknown): what a corpus without actions can say about the codes."""
    eval_pipe = eval_pipeline(pipe)
    ds = triplet_dataset(source, "val", eval_pipe, files, spec)
    return encode_triplets(iter_batches(ds, source.frame_shape, 512, eval_pipe, offset=offset), n, encoders, contexts)


@torch.no_grad()
def encode_triplets(batches: Iterable[dict[str, np.ndarray]], n: int, encoders: dict[str, Encoder],
                    contexts: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """The first ``n`` triplets of ``batches`` through ``encoders``: ``action``, ``episode_id``
    and ``<name>/<key>`` arrays; with ``contexts`` > 0 also ``context/frames`` (up to that many
    whole triplets, a seeded sample over the ``n``, of distinct episodes where there are enough)
    and ``context/action``, for the atlas."""
    out: dict[str, list[np.ndarray]] = {"action": [], "episode_id": []}
    sample = ContextSample(4 * contexts, seed) if contexts > 0 else None
    have = 0
    for b in batches:
        take = min(len(b["action"]), n - have)
        frames = np.ascontiguousarray(b["frames"][:take])
        out["action"].append(b["action"][:take].astype(np.int64))
        out["episode_id"].append(b["episode_id"][:take].astype(np.int64))
        if sample is not None:
            sample.add(frames, b["episode_id"][:take], b["action"][:take])
        for name, fn in encoders.items():
            for key, value in fn(torch.from_numpy(frames)).items():
                out.setdefault(f"{name}/{key}", []).append(value.float().numpy() if value.is_floating_point()
                                                          else value.numpy())
        have += take
        if have >= n:
            break
    enc = {k: np.concatenate(v) for k, v in out.items() if v}
    if sample is not None:
        taken = sample.take(contexts)
        enc["context/frames"], enc["context/action"] = taken["frames"], taken["action"]
    return enc


def idm_encoder(model: torch.nn.Module) -> Encoder:
    """A latent IDM (``models.LatentDynamics``) as the probe reads it: its latent and its codes."""
    return lambda f: dict(zip(("latent", "codes"), model.encode(f)))


def supervised_encoder(model: torch.nn.Module) -> Encoder:
    """The supervised IDM (``models.SupervisedIDM``): its latent layer, and its head's logits for
    the direct classifier."""
    return lambda f: {"latent": model.features(f), "logits": model.head(model.features(f))}


def code_figures(enc: dict[str, np.ndarray], actions: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    """Code-action NMI (of the whole code tuple and per codebook) and codebook perplexity of each
    of ``names``' codes."""
    codes = {}
    for name in names:
        cb = enc[f"{name}/codes"]
        codes[name] = {"nmi": code_action_nmi(cb, actions), "perplexity": codebook_perplexity(cb)}
        # Per codebook too: the whole tuple can have nearly as many values as there are triplets
        # (16^4 in the cpu preset), which leaves the chance-corrected estimate little room.
        codes[name]["nmi"]["per_codebook"] = [code_action_nmi(cb[:, c], actions)["nmi"] for c in range(cb.shape[1])]
    return codes


def fit_probes(enc: dict[str, np.ndarray], cfg: ProbeConfig, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The probe of each of ``names`` whose ``<name>/latent`` ``enc`` holds, on the triplets'
    halves by episode (``probe_figures``' ``fitted``)."""
    actions, episodes = enc["action"], enc["episode_id"]
    test = probe_halves(episodes)
    return {name: probe_accuracy(enc[f"{name}/latent"], actions, test, cfg, episode_ids=episodes)
            for name in names if f"{name}/latent" in enc}


def probe_figures(enc: dict[str, np.ndarray], cfg: ProbeConfig, coded: tuple[str, ...],
                  fitted: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """probe.json's figures from encodings of labelled held-out triplets: ``enc`` holds
    ``action``, ``episode_id`` and ``<name>/latent`` for "trained", "untrained" and, for the
    ceiling, "supervised" (with ``supervised/logits`` for the direct classifier), and
    ``<name>/codes`` for each of ``coded``. The triplets split in halves by episode, the probe of
    each latent is fitted on one half and tested on the other, and the report sets the trained
    latent against the majority rate, the floor and the ceiling. Latents from outside lapo_ray
    (another implementation's IDM on the same triplets) are measured by the same function.
    ``fitted``: probe accuracies already fitted on these triplets (a floor reused over steps)."""
    actions, test = enc["action"], probe_halves(enc["episode_id"])
    acc = {**fit_probes(enc, cfg, [n for n in ("trained", "untrained", "supervised") if n not in (fitted or {})]),
           **(fitted or {})}
    direct = classifier_accuracy(enc["supervised/logits"], actions, test) if "supervised/logits" in enc else None
    return probe_report(acc["trained"], acc["untrained"], acc.get("supervised"), majority_rate(actions, test),
                        direct_classifier=direct, codes=code_figures(enc, actions, coded))


def probe_references(cfg: PretrainConfig, source: Source, files: list[str], spec: SplitSpec,
                     encoders: dict[str, Encoder], steps_done: int | None,
                     contexts: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """probe.json: the probe of each of ``encoders`` ("trained", "untrained" and, for the
    ceiling, "supervised") on the validation episodes of ``files`` under ``spec``, split in halves by
    episode, reported against the majority rate, with code-action NMI and codebook perplexity for
    the trained and untrained IDM. Also returns what the encoders gave on the probe's triplets
    (with ``contexts`` of them whole, for the atlas)."""
    t0 = time.monotonic()
    enc = encode_probe_triplets(source, cfg.data, cfg.probe.triplets, files, spec, encoders, cfg.model.frame_offset,
                                contexts)
    if len(enc["action"]) < 32:
        raise UsageError(f"probe: only {len(enc['action'])} labelled validation triplets")
    # Without VQ (--model.vq.enabled false) there are no codes: NMI and perplexity are n/a.
    report = probe_figures(enc, cfg.probe, ("trained", "untrained") if cfg.model.vq.enabled else ())
    report["stage1_steps"] = steps_done
    report["probe_set"] = ("validation episodes, split in halves by episode; the probe's epoch is picked on "
                           f"{cfg.probe.val_fraction:.0%} of the training half's episodes")
    print(f"probe: {len(enc['action'])} triplets, {time.monotonic() - t0:.0f}s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report.items() if isinstance(v, float)), flush=True)
    return report, enc


def probe_per_source(cfg: PretrainConfig, source: Source, files: list[str], spec: SplitSpec,
                     encoders: dict[str, Encoder], steps_done: int) -> dict[str, Any]:
    """The probe of ``probe_references`` on each source's own validation episodes (the same
    encoders: the ceiling is the one trained on all of them), keyed by the source as ``--corpus``
    names it; empty for one source."""
    out: dict[str, Any] = {}
    for part in source.source_parts(files, spec):
        if not part.source.has_actions:
            out[part.label] = {"skipped": "no actions"}
            continue
        try:
            out[part.label], _ = probe_references(cfg, part.source, part.files, part.spec, encoders, steps_done)
        except ValueError as e:  # too few labelled validation triplets in this source
            out[part.label] = {"skipped": str(e)}
    return out
