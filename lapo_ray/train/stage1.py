"""Stage 1's task as the pretrain pipeline builds it: the recipe options and, with
``--stage1.action-labels``, the action-labelled training triplets every worker holds."""

from __future__ import annotations

import time

import numpy as np

from lapo_ray import UsageError
from lapo_ray.config import PipelineConfig, PretrainConfig
from lapo_ray.data.resident import check_fits, estimate_split_bytes, worker_device_memory
from lapo_ray.data.sources import ScanReport, Source
from lapo_ray.data.splits import SplitSpec
from lapo_ray.data.triplets import batches_with_actions
from lapo_ray.train.recipes import action_label_fraction, triplet_hash_np
from lapo_ray.train.stages import ActionLabelSet, Stage1Task, TrainingMetric

# Every training worker holds the action-labelled triplets (ActionLabelSet) in memory, and on GPUs
# a second copy.
ACTION_LABEL_SET_MAX_BYTES = 2 * 2**30


def load_action_label_set(source: Source, pipe: PipelineConfig, files: list[str], spec: SplitSpec,
                          fraction: float, offset: int = 1, seed: int = 0) -> ActionLabelSet:
    """The training triplets that ``recipes.triplet_hash_np`` marks labelled (about ``fraction`` of
    them), read once in source order; ``seed`` seeds the set's draws."""
    if not source.has_actions:
        raise UsageError(f"--stage1.action-labels: the corpus {source.name} has no actions to label with")
    t0 = time.monotonic()
    frames, actions = [], []
    for b in batches_with_actions(source, pipe, files, spec, offset, split="train"):
        keep = triplet_hash_np(b["episode_id"], b["step"]) < fraction
        if keep.any():
            frames.append(b["frames"][keep])
            actions.append(b["action"][keep].astype(np.int64))
    if not actions:
        raise UsageError(f"--stage1.action-labels: no labelled training triplet in {source.name} "
                         f"(hash fraction {fraction:.3g})")
    action_label_set = ActionLabelSet(np.concatenate(frames), np.concatenate(actions), seed=seed)
    print(f"stage 1: {len(action_label_set.actions)} labelled training triplets read in "
          f"{time.monotonic() - t0:.0f}s", flush=True)
    return action_label_set


def stage1_task(cfg: PretrainConfig, source: Source, scan: ScanReport, spec: SplitSpec,
                probe: TrainingMetric | None) -> Stage1Task:
    """Stage 1's task with its recipe options and ``probe`` (measured at each report); the
    labelled share is sized from the training split's triplet count (episodes are about equally
    long, so the episode share stands in). The held corpus's fit is checked earlier, with the
    rest of the input, before the run folder is written (``check_device_resident``)."""
    action_label_set = None
    if cfg.stage1.action_labels > 0:
        need = cfg.stage1.action_labels * 3 * int(np.prod(source.frame_shape))
        if need > ACTION_LABEL_SET_MAX_BYTES:
            raise UsageError(
                f"--stage1.action-labels {cfg.stage1.action_labels}: the labelled triplets would take "
                f"{need / 2**30:.1f} GiB in every training worker's memory (at most "
                f"{ACTION_LABEL_SET_MAX_BYTES / 2**30:.0f} GiB); LAOM's few labels are a few thousand")
        n_eps = max(1, len(scan.episode_ids))
        train_share = 1.0 - (len(spec.val_episodes or ()) / n_eps)
        fraction = action_label_fraction(cfg.stage1.action_labels, int(scan.triplets * train_share))
        action_label_set = load_action_label_set(source, cfg.data, scan.files, spec, fraction,
                                                 cfg.model.frame_offset, cfg.stage1.seed)
    return Stage1Task(cfg.model, probe, recipe=cfg.stage1, action_label_set=action_label_set)


def check_device_resident(cfg: PretrainConfig, source: Source, scan: ScanReport, spec: SplitSpec) -> None:
    """With --data.device-resident, refuse before training a training split that would not fit
    each worker's device: a GPU worker holds its 1/N share, the CPU workers of one node hold it
    all between them. The ceiling trains after stage 1 on the same split, so this covers it too."""
    if not cfg.data.device_resident:
        return
    need = estimate_split_bytes(scan, spec, "train", tuple(source.frame_shape))
    stage = cfg.stage1
    per_worker = -(-need // stage.num_workers) if stage.use_gpu else need
    name, free = worker_device_memory(stage.use_gpu)
    what = (f"the training split ({need / 2**30:.1f} GiB over {stage.num_workers} GPU workers)" if stage.use_gpu
            else "the training split (held by this node's CPU workers together)")
    check_fits(per_worker, name, free, int(cfg.data.resident_margin_gb * 2**30), what)
    print(f"stage 1: the training split, about {need / 2**30:.2f} GiB, will be held on the workers' devices "
          f"({name}: {free / 2**30:.1f} GiB free)", flush=True)
