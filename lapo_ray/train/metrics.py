"""Metrics to the artifact folder (``metrics.jsonl``) and to wandb.

wandb runs offline unless the user gives a project or a WANDB_API_KEY, so a machine without a
network never waits on it; ``mode="disabled"`` turns it off. The API key is read from the
environment (or ``wandb login``'s file) by wandb itself and never written anywhere by lapo_ray;
online mode without one falls back to offline instead of prompting.

Each stage of a job is one wandb run (``WandbRun``): ``job_type`` the stage, ``group`` the job
(``--wandb.group``, else the artifact folder's name), offline files under ``<out>/wandb``. The
run lives in the driver's process: a Ray Train stage's rank 0 writes ``metrics.jsonl`` only, and
the driver follows that file while the stage trains (``WandbRun.following``), then adds the
stage's summary figures and its plots as images before finishing the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from lapo_ray import storage
from lapo_ray.config import WandbConfig


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if (cfg.project or os.environ.get("WANDB_API_KEY")) else "offline"


def wandb_group(cfg: WandbConfig, out_uri: str) -> str:
    """The job a stage's run belongs to: ``cfg.group``, else the artifact folder's name."""
    return cfg.group or os.path.basename(storage.absolute(out_uri).rstrip("/")) or "lapo_ray"


def wandb_dir(out_uri: str) -> str:
    """The folder wandb writes into (its runs go to ``<dir>/wandb/``): the artifact folder when it
    is local, else ``WANDB_DIR`` or the working folder (wandb cannot write to an object store)."""
    # A file:// URI is local too, but wandb takes it for a relative folder named "file:".
    return storage.local_path(storage.absolute(out_uri)) or os.environ.get("WANDB_DIR") or "."


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if k not in ("stage", "time", "step") and isinstance(v, (int, float))}


def flat_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict as ``a/b/c`` keys (for a run's summary)."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flat_scalars(v, key))
        elif isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out[key] = v
    return out


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables that are unset, for the duration of the block."""
    added = []
    for k, v in values.items():
        if k not in os.environ:
            os.environ[k] = v
            added.append(k)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class WandbRun:
    """One stage's wandb run, opened on first use (a stage with nothing to log makes no run).

    Offline (and online) files go to ``<out>/wandb/``; wandb's own debug log and cache too, so
    nothing lands in the home folder. No banner, no console capture, no system-metrics thread,
    no login prompt; a wandb that fails to start prints one line and the job goes on without it.
    """

    def __init__(self, cfg: WandbConfig, out_uri: str, stage: str, run_config: dict[str, Any] | None = None):
        self.cfg, self.stage, self.run_config = cfg, stage, run_config or {}
        self.out_uri = storage.absolute(out_uri)
        self.mode = wandb_mode(cfg)
        self.step = 0  # the last step logged
        self._run = None
        self._failed = self.mode == "disabled"
        self._lock = threading.Lock()

    @property
    def run(self):
        """The wandb Run, started now if not yet; None when disabled or when wandb failed."""
        if self._run is None and not self._failed:
            try:
                self._run = self._start()
            except Exception as e:  # noqa: BLE001  (wandb must never stop a job)
                self._fail(e)
        return self._run

    def _fail(self, e: Exception) -> None:
        """wandb must never stop a job: one line, and no more wandb for this stage."""
        if not self._failed:
            print(f"wandb: not logging {self.stage} any more ({type(e).__name__}: {e})", flush=True)
        self._failed = True
        run, self._run = self._run, None
        if run is not None:
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)

    def _start(self):
        import wandb  # lazy: heavy, and only a run with wandb on needs it

        root = wandb_dir(self.out_uri)
        os.makedirs(os.path.join(root, "wandb"), exist_ok=True)
        # wandb-core's debug log and cache default to ~/.cache/wandb: keep them with the runs.
        with _env(WANDB_SILENT="true", WANDB_CACHE_DIR=os.path.join(root, "wandb", ".cache")):
            mode = self.mode
            if mode == "online" and not wandb.login(prompt=False, verify=False):
                print("wandb: no API key (WANDB_API_KEY or `wandb login`): logging offline", flush=True)
                mode = "offline"
            group = wandb_group(self.cfg, self.out_uri)
            folder = os.path.basename(self.out_uri.rstrip("/"))
            return wandb.init(
                project=self.cfg.project or "lapo_ray", mode=mode, dir=root,
                name=folder if self.stage in folder else f"{folder}-{self.stage}",
                group=group, job_type=self.stage, config=self.run_config,
                # Several runs at once: the ceiling trains while stage 1's run is still open.
                reinit="create_new",
                settings=wandb.Settings(silent=True, console="off", init_timeout=30, x_disable_stats=True,
                                        x_save_requirements=False),
            )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log the numeric values of ``metrics`` (a metrics.jsonl row: its ``step`` is the step)."""
        step = int(metrics.get("step", self.step) if step is None else step)
        with self._lock:
            run = self.run
            if run is None:
                return
            try:
                run.log(_scalars(metrics), step=step)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
            self.step = max(self.step, step)

    def log_rows(self, metrics_uri: str) -> int:
        """Log this stage's rows of ``metrics_uri`` past the last step logged; returns how many.
        Steps a restarted stage trains again (after ``MetricsSink.rewind``) are not logged twice:
        wandb's steps only go up."""
        if self._failed or not storage.exists(metrics_uri):
            return 0
        n = 0
        for line in storage.read_bytes(metrics_uri).decode().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line rank 0 is writing right now
                break
            if row.get("stage") == self.stage and int(row.get("step", 0)) > self.step:
                self.log(row)
                n += 1
        return n

    @contextlib.contextmanager
    def following(self, metrics_uri: str, every_s: float = 2.0) -> Iterator[WandbRun]:
        """While the block runs (a stage training on Ray Train), log the rows its rank 0 appends
        to ``metrics_uri``, every ``every_s`` seconds, and the rest when the block ends."""
        if self._failed:
            yield self
            return
        stop = threading.Event()

        errors: list[str] = []

        def poll() -> None:
            try:
                self.log_rows(metrics_uri)
            except Exception as e:  # noqa: BLE001  (an object store's hiccup: the next poll reads it all)
                if not errors:
                    print(f"wandb: reading {metrics_uri}: {type(e).__name__}: {e}", flush=True)
                errors.append(str(e))

        def loop() -> None:
            while not stop.wait(every_s):
                poll()

        thread = threading.Thread(target=loop, name=f"wandb-{self.stage}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            poll()

    def log_summary(self, values: dict[str, Any], prefix: str = "") -> None:
        """Numeric leaves of ``values`` into the run's summary (e.g. the probe's figures)."""
        with self._lock:
            run = self.run
            try:
                if run is not None:
                    run.summary.update(flat_scalars(values, prefix))
            except Exception as e:  # noqa: BLE001
                self._fail(e)

    def log_images(self, uris: Iterable[str], step: int | None = None) -> list[str]:
        """The PNG plots among ``uris`` that exist, as ``plots/<name>`` images at ``step`` (the
        last step logged); returns the keys logged."""
        uris = [u for u in uris if storage.exists(u)]
        if not uris:
            return []
        import wandb  # lazy: heavy, and only a run with wandb on needs it

        with tempfile.TemporaryDirectory() as tmp, self._lock:
            if self.run is None:
                return []
            images = {}
            try:
                for uri in uris:
                    name = os.path.splitext(os.path.basename(uri))[0]
                    path = storage.local_path(uri)
                    if path is None:  # an object store: wandb reads local files
                        path = os.path.join(tmp, os.path.basename(uri))
                        with open(path, "wb") as f:
                            f.write(storage.read_bytes(uri))
                    images[f"plots/{name}"] = wandb.Image(path, caption=f"{self.stage}: {os.path.basename(uri)}")
                self._run.log(images, step=self.step if step is None else max(int(step), self.step))
            except Exception as e:  # noqa: BLE001
                self._fail(e)
                return []
        return sorted(images)

    def finish(self) -> None:
        """Finish the run (if one started); later calls log nothing."""
        with self._lock:
            run, self._run = self._run, None
            self._failed = True  # finished: no second run for this stage
            if run is not None:
                try:
                    run.finish()
                except Exception as e:  # noqa: BLE001
                    print(f"wandb: finishing {self.stage}: {type(e).__name__}: {e}", flush=True)

    def __getstate__(self) -> dict[str, Any]:
        # Sent to another process (a sink for Ray Train's rank 0) unstarted: a run is per process.
        return {**self.__dict__, "_run": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __enter__(self) -> WandbRun:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class MetricsSink:
    """Rows to ``metrics.jsonl``; picklable: built on the driver, used on Ray Train's rank 0.

    ``wandb`` is a ``WandbRun`` of this process (the finetune loop logs on the driver), or a
    ``WandbConfig`` for a run opened in whichever process logs; None: the file only (a Ray Train
    stage's run follows the file from the driver, see ``WandbRun.following``). ``path``: another
    file than ``<out>/metrics.jsonl``."""

    def __init__(self, out_uri: str, stage: str, wandb: WandbRun | WandbConfig | None = None,
                 run_config: dict[str, Any] | None = None, *, path: str | None = None):
        # Resolved here, on the driver: rank 0 runs in a working folder of Ray's own.
        out_uri = storage.absolute(out_uri)
        self.path = storage.absolute(path) if path else storage.join(out_uri, "metrics.jsonl")
        self.out_uri, self.stage = out_uri, stage
        self._owns_run = isinstance(wandb, WandbConfig)
        self._wandb = WandbRun(wandb, out_uri, stage, run_config) if self._owns_run else wandb

    def log(self, metrics: dict[str, Any]) -> None:
        record = {"stage": self.stage, "time": time.time(), **metrics}
        storage.append_line(self.path, json.dumps(record))
        if self._wandb is not None:
            self._wandb.log(metrics)

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
        """Finish the wandb run when the sink opened it (from a ``WandbConfig``)."""
        if self._wandb is not None and self._owns_run:
            self._wandb.finish()


def read_metrics(out_uri: str, stage: str | None = None) -> list[dict[str, Any]]:
    path = storage.join(out_uri, "metrics.jsonl")
    if not storage.exists(path):
        return []
    rows = [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]
