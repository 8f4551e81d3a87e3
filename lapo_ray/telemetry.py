"""Throughput counters for the Ray dashboard, exported with ``ray.util.metrics``.

Every Ray process (driver, actor, task, Ray Train worker) hands its metrics to the metrics agent
of its node, which serves them to Prometheus (and so to the dashboard's Metrics tab and Grafana)
as ``ray_lapo_<name>`` (counters also as ``ray_lapo_<name>_total``). Rates such as triplets or
frames per second are ``rate(ray_lapo_triplets_served_total[1m])`` over a counter; the training
loop and the RL side also set gauges for the rate they measure themselves.

    from lapo_ray import telemetry
    telemetry.count("env_steps", n, {"component": "env_runner"})
    telemetry.gauge("env_steps_per_s", rate, {"component": "env_runner"})

Outside Ray (plain scripts, unit tests without ``ray.init``) both calls do nothing, so library
code calls them unconditionally. A metric that cannot be exported never stops a job: the error is
logged once and the call becomes a no-op.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

PREFIX = "lapo_"


@dataclass(frozen=True)
class MetricSpec:
    kind: Literal["counter", "gauge"]
    description: str
    tag_keys: tuple[str, ...] = ()


METRICS: dict[str, MetricSpec] = {
    "frames_collected": MetricSpec(
        "counter", "Frames of finished episodes recorded by corpus collection actors", ("game",)),
    "triplets_served": MetricSpec(
        "counter", "Frame triplets (o[t-1], o[t], o[t+1]) cut from episode segments for a consumer"),
    "train_samples": MetricSpec(
        "counter", "Training samples consumed by Ray Train workers", ("stage",)),
    "train_samples_per_s": MetricSpec(
        "gauge", "Training samples per second of one Ray Train worker over its last report window",
        ("stage", "rank")),
    "labelled_frames": MetricSpec(
        "counter", "Frames labelled with the IDM's latent action by labelling actors"),
    "env_steps": MetricSpec(
        "counter", "Environment steps of rollout workers (each sub-environment step counts)", ("component",)),
    "env_steps_per_s": MetricSpec(
        "gauge", "Environment steps per second measured by a rollout component", ("component",)),
}

_lock = threading.Lock()
_instances: dict[str, object] = {}
_broken: set[str] = set()


def define(name: str, kind: Literal["counter", "gauge"], description: str, tag_keys: tuple[str, ...] = ()) -> None:
    """Add a metric to ``METRICS`` (idempotent for an identical definition)."""
    spec = MetricSpec(kind, description, tuple(tag_keys))
    old = METRICS.get(name)
    if old is not None and old != spec:
        raise ValueError(f"telemetry metric {name!r} is already defined as {old}")
    METRICS[name] = spec


def enabled() -> bool:
    """True in a process connected to Ray (a driver after ``ray.init`` or any Ray worker)."""
    ray = sys.modules.get("ray")  # not imported: certainly not connected, and no import cost
    return ray is not None and ray.is_initialized()


def _spec(name: str, kind: str, tags: dict[str, str] | None) -> MetricSpec:
    spec = METRICS.get(name)
    if spec is None:
        raise KeyError(f"unknown telemetry metric {name!r}; known: {', '.join(sorted(METRICS))} "
                       "(add one with telemetry.define)")
    if spec.kind != kind:
        raise TypeError(f"telemetry metric {name!r} is a {spec.kind}, not a {kind}")
    given = set(tags or {})
    if given != set(spec.tag_keys):
        raise ValueError(f"telemetry metric {name!r} takes tags {sorted(spec.tag_keys)}, got {sorted(given)}")
    return spec


def _metric(name: str, spec: MetricSpec):
    m = _instances.get(name)
    if m is None:
        with _lock:
            m = _instances.get(name)
            if m is None:
                # lazy: telemetry sits below every room, on paths that run without Ray
                from ray.util import metrics

                cls = metrics.Counter if spec.kind == "counter" else metrics.Gauge
                m = cls(PREFIX + name, description=spec.description, tag_keys=spec.tag_keys)
                _instances[name] = m
    return m


def _record(name: str, kind: str, value: float, tags: dict[str, str] | None) -> None:
    spec = _spec(name, kind, tags)  # wrong names and tags are bugs: raise even outside Ray
    if name in _broken or not enabled():
        return
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    try:
        m = _metric(name, spec)
        if kind == "counter":
            m.inc(float(value), tags=str_tags)
        else:
            m.set(float(value), tags=str_tags)
    except Exception as e:  # the metrics pipeline must never stop training or collection
        _broken.add(name)
        log.warning("telemetry: cannot export %s (%s: %s); not recording it in this process",
                    name, type(e).__name__, e)


def count(name: str, value: float = 1, tags: dict[str, str] | None = None) -> None:
    """Add ``value`` to counter ``name``. Values <= 0 are ignored (counters only grow)."""
    if value > 0:
        _record(name, "counter", value, tags)
    else:
        _spec(name, "counter", tags)


def gauge(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    """Set gauge ``name`` to ``value``."""
    _record(name, "gauge", value, tags)
