"""Connecting to Ray the same way from every job."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

# What every process of a lapo_ray job needs (the driver, Ray Train's controller, Ray Data's
# coordinators): set for the job's runtime environment; a value the job was given wins.
JOB_ENV = {
    # The dashboard's Train view lists runs only with this on.
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    # Ray Data reads Parquet footers on a fresh pool of 32 actors for every dataset it plans;
    # a one-shard pretrain job started 192 of them. A corpus's few footers need one.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    # Ray Train turns a worker's print into a log record and, when wandb has wrapped stdout,
    # prints it as well: every progress line appeared twice in `ray job logs`.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def job_env() -> dict[str, str]:
    """JOB_ENV, less the variables the submitted job's runtime_env already sets (Ray refuses to
    merge two values for one key)."""
    injected = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    taken = set(((injected.get("runtime_env") or {}).get("env_vars") or {}))
    return {k: os.environ.get(k, v) for k, v in JOB_ENV.items() if k not in taken}


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster the job was submitted to, or start a local one.

    Under ``ray job submit`` RAY_ADDRESS points at the cluster. A local instance keeps the
    dashboard on 127.0.0.1 and Ray 2.60's token authentication on.
    """
    import ray

    if ray.is_initialized():
        return
    env = job_env()
    for k, v in env.items():  # the driver reads some of them itself (Ray Train's state tracking)
        os.environ.setdefault(k, v)
    runtime_env = {"env_vars": env} if env else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", runtime_env=runtime_env)
    from ray.data import DataContext

    # Plain log lines instead of terminal progress bars: they read well in `ray job logs`.
    DataContext.get_current().enable_progress_bars = False


def run_job(body: Callable[[], object]) -> int:
    """Run a job's body. Bad input (a missing folder or file, a value that makes no sense) ends it
    with one line naming the input and exit status 2 instead of a traceback; LAPO_DEBUG=1 shows
    the traceback too."""
    try:
        body()
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        if os.environ.get("LAPO_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
