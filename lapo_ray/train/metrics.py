"""Metrics to the artifact folder (``metrics.jsonl``) and to wandb.

wandb runs offline unless the user gives a project or a WANDB_API_KEY, so a machine without a
network never waits on it; ``mode="disabled"`` turns it off. The API key is read from the
environment by wandb itself and never written anywhere by lapo_ray.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from lapo_ray import storage
from lapo_ray.config import WandbConfig


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if (cfg.project or os.environ.get("WANDB_API_KEY")) else "offline"


class MetricsSink:
    """Picklable: built on the driver, used on Ray Train's rank 0."""

    def __init__(self, out_uri: str, stage: str, wandb_cfg: WandbConfig, run_config: dict[str, Any]):
        # Resolved here, on the driver: rank 0 runs in a working folder of Ray's own.
        out_uri = storage.absolute(out_uri)
        self.path = storage.join(out_uri, "metrics.jsonl")
        self.out_uri, self.stage, self.wandb_cfg, self.run_config = out_uri, stage, wandb_cfg, run_config
        self._run = None

    def _wandb(self):
        mode = wandb_mode(self.wandb_cfg)
        if mode == "disabled":
            return None
        if self._run is None:
            import wandb

            # A file:// URI is local too, but wandb takes it for a relative folder named "file:".
            local = storage.local_path(self.out_uri) or "."
            os.environ.setdefault("WANDB_SILENT", "true")
            self._run = wandb.init(
                project=self.wandb_cfg.project or "lapo_ray", mode=mode, dir=local,
                name=f"{os.path.basename(os.path.abspath(self.out_uri))}-{self.stage}",
                group=os.path.basename(os.path.abspath(self.out_uri)), job_type=self.stage,
                config=self.run_config, reinit="finish_previous",
                settings=wandb.Settings(init_timeout=30, x_disable_stats=True),
            )
        return self._run

    def log(self, metrics: dict[str, Any]) -> None:
        record = {"stage": self.stage, "time": time.time(), **metrics}
        storage.append_line(self.path, json.dumps(record))
        run = self._wandb()
        if run is not None:
            run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=int(metrics.get("step", 0)))

    def rewind(self, step: int) -> int:
        """Drop this stage's rows past ``step`` (the checkpoint a restarted run resumes from), so
        the steps it trains again are logged once: a worker group that died after a report but
        before the next checkpoint had already logged them. Returns how many rows went."""
        if not storage.exists(self.path):
            return 0
        lines = storage.read_bytes(self.path).decode().splitlines()
        keep = []
        for line in lines:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("stage") != self.stage or int(row.get("step", 0)) <= step:
                keep.append(line)
        dropped = sum(1 for line in lines if line.strip()) - len(keep)
        if dropped:
            storage.write_bytes(self.path, ("\n".join(keep) + "\n" if keep else "").encode())
        return dropped

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def read_metrics(out_uri: str, stage: str | None = None) -> list[dict[str, Any]]:
    path = storage.join(out_uri, "metrics.jsonl")
    if not storage.exists(path):
        return []
    rows = [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]
