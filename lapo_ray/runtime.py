"""Connecting to Ray the same way from every job."""

from __future__ import annotations

import os


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
