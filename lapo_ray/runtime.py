"""Connecting to Ray the same way from every job."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster the job was submitted to, or start a local one.

    Under ``ray job submit`` RAY_ADDRESS points at the cluster. A local instance keeps the
    dashboard on 127.0.0.1 and Ray 2.60's token authentication on.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1")
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
