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
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch

from lapo_ray import UsageError, storage
from lapo_ray.config import ModelConfig, config_from_dict
from lapo_ray.envs import NUM_ACTIONS

STATE_FILE, CONFIG_FILE = "state.json", "config.json"


def save_checkpoint(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], config: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, indent=2)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_weights(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a local checkpoint folder's weights (and optimiser state) in place."""
    model.load_state_dict(torch.load(os.path.join(directory, "model.pt"), map_location="cpu", weights_only=True))
    opt_path = os.path.join(directory, "optimizer.pt")
    if optimizer is not None and os.path.exists(opt_path):
        optimizer.load_state_dict(torch.load(opt_path, map_location="cpu", weights_only=True))


@dataclass
class Checkpoint:
    """One checkpoint folder (path or URI): where it is, how far its run got and what it was
    trained with. ``state.json`` and ``config.json`` are each read once, when first asked for."""

    uri: str
    _state: dict[str, Any] | None = field(default=None, repr=False)
    _config: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def latest(cls, stage_uri: str) -> Checkpoint | None:
        """The ``checkpoint_*`` folder of highest step that Ray Train wrote under a stage's run
        folder; None when there is none."""
        if not storage.exists(stage_uri):
            return None
        fs, path = storage.resolve(stage_uri)
        dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory
                and os.path.basename(i.path).startswith("checkpoint_")]
        best: tuple[str, dict[str, Any]] | None = None
        for d in dirs:
            try:
                with fs.open_input_stream(f"{d}/{STATE_FILE}") as f:
                    state = json.loads(f.read())
                step = state["step"]
            except (OSError, FileNotFoundError, KeyError, ValueError, TypeError):
                continue  # a checkpoint still being uploaded or broken: skip it
            if best is None or step > best[1]["step"]:
                best = d, state
        if best is None:
            return None
        # Built from the caller's URI, not from the filesystem's path: that keeps the URI's own
        # spelling and any options in its query string (e.g. an S3 endpoint_override).
        uri = best[0] if "://" not in stage_uri else storage.join(stage_uri, os.path.basename(best[0]))
        return cls(uri, best[1])

    @classmethod
    def finished(cls, stage_uri: str) -> Checkpoint | None:
        """The stage's latest checkpoint if its run finished there (``done``), else None."""
        ckpt = cls.latest(stage_uri)
        return ckpt if ckpt is not None and ckpt.done else None

    @property
    def state(self) -> dict[str, Any]:
        """``state.json``: step, epoch, epoch_step, train_seconds, stage, done."""
        if self._state is None:
            uri = storage.join(self.uri, STATE_FILE)
            state = storage.read_json(uri)
            if not isinstance(state, dict):
                raise UsageError(f"{uri}: not a lapo_ray checkpoint's state")
            self._state = state
        return self._state

    @property
    def config(self) -> dict[str, Any]:
        """``config.json``: the resolved PretrainConfig the checkpoint was trained with, as a dict."""
        if self._config is None:
            self._config = storage.read_json(storage.join(self.uri, CONFIG_FILE))
        return self._config

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def done(self) -> bool:
        return bool(self.state.get("done"))

    @property
    def stage(self) -> str | None:
        """The stage that wrote it; None in checkpoints from before the field existed."""
        return self.state.get("stage")

    def model_config(self) -> ModelConfig:
        """The ModelConfig the checkpoint was trained with."""
        uri = storage.join(self.uri, CONFIG_FILE)
        if not isinstance(self.config, dict) or not isinstance(self.config.get("model"), dict):
            raise UsageError(f"{uri}: no model config in it; not a lapo_ray checkpoint")
        try:
            return config_from_dict(ModelConfig, self.config["model"])
        except (TypeError, ValueError) as e:
            raise UsageError(f"{uri}: its model config does not fit this version of lapo_ray ({e})") from e


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[str]:
    """A local folder holding the checkpoint at ``uri`` (a path, or a URI downloaded for the block)."""
    if "://" not in uri:
        yield uri
        return
    import ray.train  # lazy: jobs import this before they check their input (architecture.md, Imports)

    fs, path = storage.resolve(uri)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
        yield d


def new_dynamics(ckpt: Checkpoint):
    """An untrained stage-1 model (IDM + world model) of the shape ``ckpt``'s config names; any
    folder with a ``config.json`` of a run will do (a checkpoint, an export)."""
    # lazy: the models import PyTorch's nn stack; jobs that read a checkpoint's state need no model
    from lapo_ray.models import LatentDynamics

    # A run with --stage1.action-labels saved its label head too.
    head = int(ckpt.config.get("stage1", {}).get("action_labels", 0) or 0) > 0
    return LatentDynamics(ckpt.model_config(), num_actions=NUM_ACTIONS if head else 0)


def new_latent_policy(cfg: ModelConfig):
    """An untrained latent policy of the shape ``cfg`` names."""
    from lapo_ray.models import LatentPolicy  # lazy, as in new_dynamics

    return LatentPolicy(cfg.policy, cfg.latent_dim, cfg.channels, cfg.frame_size)


def load_dynamics(uri: str):
    """The stage-1 model (IDM + world model) from its checkpoint alone: its config travels with it."""
    with local_checkpoint(uri) as d:
        model = new_dynamics(Checkpoint(d))
        load_weights(d, model)
    return model.eval()


def load_latent_policy(uri: str):
    """The stage-2 latent policy and its ModelConfig from its checkpoint alone."""
    with local_checkpoint(uri) as d:
        cfg = Checkpoint(d).model_config()
        policy = new_latent_policy(cfg)
        load_weights(d, policy)
    return policy.eval(), cfg


def load_supervised_idm(uri: str) -> torch.nn.Module:
    """The supervised IDM from its checkpoint alone (its config travels with it)."""
    # lazy: the models import PyTorch's nn stack; jobs that read a checkpoint's state need no model
    from lapo_ray.models import SupervisedIDM

    with local_checkpoint(uri) as d:
        model = SupervisedIDM(Checkpoint(d).model_config(), NUM_ACTIONS)
        load_weights(d, model)
    return model.eval()
