"""The checkpoint contract: a directory any job can rebuild a model from, on any machine.

    model.pt       state_dict of the unwrapped model (parameters and buffers, EMA codebook included)
    optimizer.pt   optimiser state
    state.json     {"step", "epoch", "epoch_step" (batches of that epoch trained), "train_seconds",
                    "stage", "done"}
    config.json    the resolved PretrainConfig (``lapo_ray.config.config_from_dict`` reads it)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch

from lapo_ray import storage
from lapo_ray.config import ModelConfig, config_from_dict


def save_checkpoint(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], config: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(state, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_checkpoint(directory: str, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimiser state) in place; return ``state.json``."""
    model.load_state_dict(torch.load(os.path.join(directory, "model.pt"), map_location="cpu", weights_only=True))
    opt_path = os.path.join(directory, "optimizer.pt")
    if optimizer is not None and os.path.exists(opt_path):
        optimizer.load_state_dict(torch.load(opt_path, map_location="cpu", weights_only=True))
    with open(os.path.join(directory, "state.json")) as f:
        return json.load(f)


def read_checkpoint_config(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def latest_checkpoint(stage_uri: str) -> str | None:
    """The newest ``checkpoint_*`` folder that Ray Train wrote under a stage's run folder."""
    if not storage.exists(stage_uri):
        return None
    fs, path = storage.resolve(stage_uri)
    import pyarrow.fs as pafs

    dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory
            and os.path.basename(i.path).startswith("checkpoint_")]
    best, best_step = None, -1
    for d in dirs:
        try:
            with fs.open_input_stream(f"{d}/state.json") as f:
                step = json.loads(f.read())["step"]
        except (OSError, FileNotFoundError, KeyError, ValueError):
            continue  # a checkpoint still being uploaded or broken: skip it
        if step > best_step:
            best, best_step = d, step
    if best is None:
        return None
    # Built from the caller's URI, not from the filesystem's path: that keeps the URI's own
    # spelling and any options in its query string (e.g. an S3 endpoint_override).
    return best if "://" not in stage_uri else storage.join(stage_uri, os.path.basename(best))


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[str]:
    """A local folder holding the checkpoint at ``uri`` (a path, or a URI downloaded for the block)."""
    if "://" not in uri:
        yield uri
        return
    import ray.train

    fs, path = storage.resolve(uri)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
        yield d


def load_dynamics(uri: str):
    """The stage-1 model (IDM + world model) from its checkpoint alone: its config travels with it."""
    from lapo_ray.envs import NUM_ACTIONS
    from lapo_ray.models import LatentDynamics

    with local_checkpoint(uri) as d:
        cfg = read_checkpoint_config(d)
        # A run with --stage1.action-labels saved its label head too.
        head = int(cfg.get("stage1", {}).get("action_labels", 0) or 0) > 0
        model = LatentDynamics(config_from_dict(ModelConfig, cfg["model"]), num_actions=NUM_ACTIONS if head else 0)
        load_checkpoint(d, model)
    return model.eval()


def load_latent_policy(uri: str):
    """The stage-2 latent policy and its ModelConfig from its checkpoint alone."""
    from lapo_ray.models import LatentPolicy

    with local_checkpoint(uri) as d:
        cfg = config_from_dict(ModelConfig, read_checkpoint_config(d)["model"])
        policy = LatentPolicy(cfg.policy, cfg.latent_dim, cfg.channels, cfg.frame_size)
        load_checkpoint(d, policy)
    return policy.eval(), cfg


def load_supervised_idm(uri: str) -> torch.nn.Module:
    """The supervised IDM from its checkpoint alone (its config travels with it)."""
    from lapo_ray.evaluation.ceiling import SupervisedIDM

    with local_checkpoint(uri) as d:
        model = SupervisedIDM(config_from_dict(ModelConfig, read_checkpoint_config(d)["model"]))
        load_checkpoint(d, model)
    return model.eval()
