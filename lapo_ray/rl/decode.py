"""Offline decoding: a decoder from latent action to real action, learnt from k labelled frames.

The k frames are triplets of the pretraining corpus's train split (the only place true actions
are read for training), the first k of a seeded shuffle or, with ``--decoder.select coverage``, k
spread over the IDM's latent space (``k_center_greedy``); the IDM labels each with its latent
action and the decoder learns latent -> action by cross-entropy. The agent then plays with the
latent policy's predicted latents decoded the same way (the RL head stays at zero), so what is
evaluated is exactly the module that online fine-tuning would start from.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from lapo_ray import UsageError, storage
from lapo_ray.config import PipelineConfig, config_from_dict
from lapo_ray.config.rl import DecodeConfig, DecoderConfig
from lapo_ray.data.sources import open_source
from lapo_ray.data.triplets import iter_batches, triplet_dataset
from lapo_ray.envs import OBS_SHAPE, NUM_ACTIONS
from lapo_ray.evaluation.probe import encode_in_batches
from lapo_ray.evaluation.rollout import evaluate_on_both_level_sets
from lapo_ray.progress import Progress
from lapo_ray.rl.algo import pretrain_checkpoints
from lapo_ray.runtime import init_ray
from lapo_ray.train.checkpoint import load_dynamics

MODULE_DIR = "module"


def triplets_with_actions(source, pipe: PipelineConfig, split: str, n: int, seed: int,
                          offset: int = 1) -> dict[str, np.ndarray]:
    """Up to ``n`` triplets with a true action (frame offset ``offset``, the IDM's) of ``split``,
    drawn across episodes by a seeded shuffle."""
    pipe = dataclasses.replace(pipe, global_shuffle="files", shuffle_seed=seed, local_shuffle_buffer=4096)
    parts, have = [], 0
    for b in iter_batches(triplet_dataset(source, split, pipe), source.frame_shape, 512, pipe, offset=offset):
        keep = b["action"] >= 0
        parts.append({"frames": b["frames"][keep], "action": b["action"][keep]})
        have += int(keep.sum())
        if have >= n:
            break
    if not parts or have == 0:
        raise UsageError(f"{source.uri}: no action-labelled triplets in the {split} split; offline decoding "
                         f"needs a corpus that carries true actions")
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


def k_center_greedy(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Indices of ``k`` rows of ``x`` (N, D), each the row farthest from those picked before it,
    starting from a seeded random row (Gonzalez's farthest-point rule): the largest distance
    from any row to its nearest pick is at most twice the least any k rows can reach. Why for
    labelling: a decoder learns latent -> action, and a random k spends its labels where the
    corpus is dense (one common motion) and can miss a rare latent altogether; k centres put a
    label near every part of the latent space the corpus reaches. Outliers are centres too."""
    x = np.asarray(x, np.float64)
    k = min(k, len(x))
    if k <= 0:
        return np.zeros(0, np.int64)
    picks = [int(np.random.default_rng(seed).integers(len(x)))]
    nearest = ((x - x[picks[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        picks.append(int(nearest.argmax()))
        nearest = np.minimum(nearest, ((x - x[picks[-1]]) ** 2).sum(1))
    return np.asarray(picks, np.int64)


def labelled_frames(source, pipe: PipelineConfig, idm, decoder_cfg: DecoderConfig, seed: int) -> dict[str, np.ndarray]:
    """The k train triplets with actions the decoder learns from: the first k of a seeded shuffle
    (``random``), or k of a ``decoder_cfg.pool`` candidate pool spread over the IDM's latents by
    ``k_center_greedy`` (``coverage``)."""
    offset = idm.cfg.frame_offset
    if decoder_cfg.select == "random":
        return triplets_with_actions(source, pipe, "train", decoder_cfg.k, seed, offset)
    pool = triplets_with_actions(source, pipe, "train", max(decoder_cfg.pool, decoder_cfg.k), seed, offset)
    picks = k_center_greedy(_encode(idm, pool["frames"]).numpy(), decoder_cfg.k, seed)
    print(f"decode: coverage picked {len(picks)} of {len(pool['action'])} candidate frames", flush=True)
    return {key: value[picks] for key, value in pool.items()}


def _encode(idm, frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(encode_in_batches(lambda f: idm.encode(f)[0], frames, batch_size=512))


def build_agent(stage2_uri: str, decoder_hidden: tuple[int, ...]):
    # lazy, RLlib (rl.module's): jobs import this before they check their input (architecture.md, Imports)
    from lapo_ray.rl.module import LapoAgentModule

    return LapoAgentModule(
        observation_space=gym.spaces.Box(0, 255, OBS_SHAPE, np.uint8),
        action_space=gym.spaces.Discrete(NUM_ACTIONS),
        model_config={"latent_policy_checkpoint": stage2_uri, "policy": None,
                      "decoder_hidden": list(decoder_hidden)},
    )


def agent_logits(module):
    # lazy, RLlib: jobs import this before they check their input (architecture.md, Imports)
    from ray.rllib.core.columns import Columns

    def logits(obs: torch.Tensor) -> torch.Tensor:
        return module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]

    return logits


def decode_offline(cfg: DecodeConfig) -> dict[str, Any]:
    """Train the decoder of an agent on ``cfg.decoder.k`` triplets with true actions, save the
    agent in ``cfg.out`` and report its accuracies and returns (``decode.json``)."""
    stage1, stage2, corpus, pipe, source = _decode_input(cfg)
    init_ray()  # for Ray Data's read of the triplets with actions, once the folder and corpus pass
    torch.manual_seed(cfg.seed)
    decoder_cfg = cfg.decoder
    t0 = time.time()
    idm = load_dynamics(stage1)
    train = labelled_frames(source, pipe, idm, decoder_cfg, cfg.seed)
    val = triplets_with_actions(source, pipe, "val", decoder_cfg.held_out, cfg.seed, idm.cfg.frame_offset)
    if len(train["action"]) < decoder_cfg.k:
        print(f"decode: the train split has only {len(train['action'])} labelled triplets "
              f"(asked for {decoder_cfg.k})", flush=True)
    z_train, z_val = _encode(idm, train["frames"]), _encode(idm, val["frames"])
    a_train, a_val = torch.from_numpy(train["action"]).long(), torch.from_numpy(val["action"]).long()
    module = build_agent(stage2, cfg.decoder_hidden)
    loss_start, loss_end = _fit_decoder(module, z_train, a_train, decoder_cfg, cfg.seed)
    with torch.no_grad():
        train_acc = (module.decoded_logits(z_train).argmax(-1) == a_train).float().mean().item()
        val_acc = (module.decoded_logits(z_val).argmax(-1) == a_val).float().mean().item()
        # The agent's own view: latent policy on o[t] only, decoded, against the action taken.
        obs_val = torch.from_numpy(val["frames"][:, 1])
        agent_acc = (agent_logits(module)(obs_val).argmax(-1) == a_val).float().mean().item()
    majority = float(np.bincount(val["action"], minlength=NUM_ACTIONS).max() / len(val["action"]))
    fit_seconds = time.time() - t0

    _save_module(module, cfg.out)
    n = len(a_train)
    report: dict[str, Any] = {
        "k": int(n), "decoder_train_loss_start": loss_start, "decoder_train_loss_end": loss_end,
        "decoder_train_accuracy": train_acc,
        "train_majority_action_rate": float(np.bincount(train["action"], minlength=NUM_ACTIONS).max() / n),
        # The loss a decoder reaches from the action frequencies alone: below it, latents inform.
        "train_action_entropy": _entropy(train["action"]), "decoder_val_accuracy": val_acc,
        "agent_val_accuracy": agent_acc, "majority_action_rate": majority, "val_triplets": int(len(a_val)),
        "fit_seconds": fit_seconds, "pretrain": cfg.pretrain, "corpus": corpus, "select": decoder_cfg.select,
    }
    module.eval()
    report.update(evaluate_on_both_level_sets(agent_logits(module), cfg.env, cfg.eval, f"decoded k={n}"))
    storage.write_json(storage.join(cfg.out, "config.json"), {"variant": "offline-decoded", **dataclasses.asdict(cfg)})
    storage.write_json(storage.join(cfg.out, "decode.json"), report)
    return report


def _decode_input(cfg: DecodeConfig):
    """The stage-1 and stage-2 checkpoints, the corpus, its pipeline settings and its source;
    a pretrain folder without checkpoints or a corpus without actions fails here, before Ray."""
    stage1, stage2 = pretrain_checkpoints(cfg.pretrain)
    pretrain = storage.read_json(storage.join(cfg.pretrain, "config.json"))
    corpus = cfg.corpus or pretrain["corpus"] or pretrain["collect"]["out"]
    pipe = config_from_dict(PipelineConfig, pretrain["data"])
    source = open_source(corpus)
    if not source.has_actions:
        raise UsageError(f"{corpus}: this corpus has no true actions; offline decoding needs k labelled frames")
    return stage1, stage2, corpus, pipe, source


def _fit_decoder(module, z_train: torch.Tensor, a_train: torch.Tensor, decoder_cfg: DecoderConfig,
                 seed: int) -> tuple[float, float]:
    """Train ``module``'s decoder on the (latent, action) pairs; its loss on all of them before
    and after."""
    def full_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(module.decoded_logits(z_train), a_train).item()

    loss_start = full_loss()
    opt = torch.optim.Adam(module.decoder.parameters(), lr=decoder_cfg.lr)
    n = len(a_train)
    steps = decoder_cfg.epochs * max(1, -(-n // decoder_cfg.batch_size))
    progress = Progress(steps, f"decode k={n}", unit="steps", interval=10)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(decoder_cfg.epochs):
        for idx in torch.randperm(n, generator=gen).split(decoder_cfg.batch_size):
            loss = F.cross_entropy(module.decoded_logits(z_train[idx]), a_train[idx],
                                   label_smoothing=decoder_cfg.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            progress.update(1, extra=f"loss {loss.item():.3f}")
    progress.print()
    return loss_start, full_loss()


def _entropy(actions: np.ndarray) -> float:
    p = np.bincount(actions, minlength=NUM_ACTIONS) / len(actions)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _save_module(module, out: str) -> None:
    """RLlib's own module checkpoint (``RLModule.from_checkpoint`` reads it), written atomically."""
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, MODULE_DIR)
        module.save_to_path(local)
        storage.upload_dir(local, storage.join(out, MODULE_DIR))
