"""Stage 1's task as the pretrain pipeline builds it: the recipe options and, with
``--stage1.action-labels``, the action-labelled training triplets every worker holds."""

from __future__ import annotations

import time

import numpy as np

from lapo_ray import UsageError
from lapo_ray.config import PipelineConfig, PretrainConfig
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
    long, so the episode share stands in)."""
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
