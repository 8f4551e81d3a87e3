"""Connecting to Ray the same way from every job, and ending a job on bad input with one line."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable

from lapo_ray import UsageError

# What every process of a lapo_ray job needs (the driver, Ray Train's controller, Ray Data's
# coordinators): set for the job's runtime environment; a value the job was given wins.
JOB_ENV = {
    # The dashboard's Train view lists runs only with this on.
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    # Ray Data reads Parquet footers on a fresh pool of 32 actors for every dataset it plans,
    # 192 actors in a one-shard pretrain job (docs/results/choices.md); a corpus's few footers
    # need one.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    # Ray Train turns a worker's print into a log record and, when wandb has wrapped stdout,
    # prints it as well, so every progress line would show twice in `ray job logs`.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # A job's console is its own progress. Ray Data's INFO lines (each dataset's plan, start and
    # finish, tips) and progress bars come from every reader; its warnings still show, and a job
    # started with RAY_DATA_LOG_LEVEL=INFO gets the plans back (a value the job was given wins).
    "RAY_DATA_LOG_LEVEL": "WARNING",
    # Ray Data's progress in a worker goes to its INFO log lines, not to tqdm bars sent to the
    # driver (which warned once that tqdm is not installed). Turning the bars off instead warns
    # once in every process that they are off.
    "RAY_TQDM": "0",
    # Ray's own deprecation notes, raised inside its actors by its own code (Ray Train sets
    # ExecutionOptions.exclude_resources): nothing a user of lapo_ray can change.
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


# Only where lapo_ray starts the instance itself, on one machine: a local instance has no node a
# cluster could drain, so Ray Train's preemption watcher (an actor per run that polls the drain
# state, whose start also printed an error-level line about its restart policy into the job's
# console) has nothing to watch. Jobs on a cluster keep it.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def job_env() -> dict[str, str]:
    """JOB_ENV, less the variables the submitted job's runtime_env already sets (Ray refuses to
    merge two values for one key)."""
    injected = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    taken = set(((injected.get("runtime_env") or {}).get("env_vars") or {}))
    return {k: os.environ.get(k, v) for k, v in JOB_ENV.items() if k not in taken}


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Join the cluster the job was submitted to, or start a local one.

    Under ``ray job submit`` RAY_ADDRESS points at the cluster. A local instance keeps the
    dashboard on 127.0.0.1 and Ray 2.60's token authentication on.
    """
    # lazy: every job imports this module, the step benchmark's included, which runs without Ray
    import ray

    if ray.is_initialized():
        return
    env = job_env()
    if not os.environ.get("RAY_ADDRESS"):
        env.update({k: os.environ.get(k, v) for k, v in LOCAL_ENV.items()})
    for k, v in env.items():  # the driver reads some of them itself (Ray Train's state tracking)
        os.environ.setdefault(k, v)
    runtime_env = {"env_vars": env} if env else None
    # The driver's INFO lines (a token written, a run restored) are Ray's; its warnings show.
    common = {"logging_level": logging.WARNING, "runtime_env": runtime_env}
    if os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(log_to_driver=True, **common)
    else:
        # Ray's default turns token authentication on and says so on every start, as a warning
        # (setting RAY_AUTH_MODE here is too late: Ray has read its config at import).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ctx = ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, dashboard_host="127.0.0.1",
                       **common)
        print(f"ray: a local instance of {ray.cluster_resources().get('CPU', 0):g} CPUs, dashboard at "
              f"http://{ctx.dashboard_url}", flush=True)
    # The driver may have imported Ray Data before the variables above were set; this import
    # stays after them in case it has not.
    from ray.data import DataContext

    DataContext.get_current().use_ray_tqdm = False
    logging.getLogger("ray.data").setLevel(os.environ.get("RAY_DATA_LOG_LEVEL", JOB_ENV["RAY_DATA_LOG_LEVEL"]))


# Ray Data's read tasks take a whole CPU each; one must stay free beside a stage's own actors.
READ_CPUS = 1.0


def check_cpu_budget(what: str, actors: int, cpus_each: float, fix: str) -> None:
    """Fail before a stage starts when its workers or actors and one Ray Data read task cannot
    hold CPUs at once: Ray would queue the reads behind actors that wait on them, and the
    stage would hang without a word (seen with two 1-CPU labelling actors on a 2-CPU node).

    A cluster that grows on demand (an autoscaler; its configs in cluster/ set
    LAPO_AUTOSCALING=1) is judged by what it can become, not by what it has now, so the check
    is left out there.
    """
    import ray  # lazy: as in init_ray

    if os.environ.get("LAPO_AUTOSCALING") == "1":
        return
    total = float(ray.cluster_resources().get("CPU", 0.0))
    need = actors * cpus_each
    if need + READ_CPUS > total + 1e-9:
        raise UsageError(
            f"{what}: {actors} x {cpus_each:g} CPUs plus {READ_CPUS:g} for Ray Data's reads is "
            f"{need + READ_CPUS:g} CPUs, but the cluster has {total:g}; {fix}"
        )


def check_spread(what: str, workers: int, cpus_each: float, gpus_each: float, fix: str) -> None:
    """Fail before a stage starts when a placement of one worker per node cannot be met: Ray
    would wait for the nodes without a word. Autoscaling clusters are left out, as above."""
    import ray  # lazy: as in init_ray

    if os.environ.get("LAPO_AUTOSCALING") == "1":
        return
    fits = [n for n in ray.nodes() if n.get("Alive")
            and n["Resources"].get("CPU", 0.0) + 1e-9 >= cpus_each and n["Resources"].get("GPU", 0.0) + 1e-9 >= gpus_each]
    if len(fits) < workers:
        raise UsageError(f"{what}: STRICT_SPREAD places each of the {workers} workers on a node of its own, but "
                         f"{len(fits)} node(s) of the cluster can hold a worker of {cpus_each:g} CPUs"
                         + (f" and {gpus_each:g} GPUs" if gpus_each else "") + f"; {fix}")


def run_job(body: Callable[[], object]) -> int:
    """Run a job's body. Bad input (a ``UsageError``: a missing folder or file, a value that makes
    no sense) ends it with one line naming the input and exit status 2 instead of a traceback;
    LAPO_DEBUG=1 shows the traceback too. Any other exception is a bug: it propagates with its
    traceback, and the job's ``sys.exit(main())`` never runs, so Python exits with status 1."""
    try:
        body()
    except UsageError as e:
        if os.environ.get("LAPO_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
