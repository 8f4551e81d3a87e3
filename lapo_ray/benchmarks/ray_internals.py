"""Every Ray-private API the benchmarks use, in one place (checked on ray 2.60.0).

Why: ``bench_stream`` reports how many bytes the object store spilled to disk and restored, and
how many it had to place past its cap in the fallback file mapping. Ray keeps these counters in
each raylet; ``ray memory --stats-only`` prints them, through ``ray._private.internal_api``, and
no public API returns them in Ray 2.60 (``ray.util.state`` lists objects, not the store's
counters; the Prometheus metrics Ray exports are for a scraper to poll, not a call to make).

What is used:

* ``ray._private.internal_api.get_state_from_address`` and ``get_memory_info_reply``: the
  cluster's state from the GCS address, and the raylets' ``FormatGlobalMemoryInfo`` reply;
* the fields of that reply's ``store_stats`` (the ``ObjectStoreStats`` message of
  ``ray.core.generated.node_manager_pb2.FormatGlobalMemoryInfoReply``) named in
  ``STORE_STATS_FIELDS``.

What breaks if Ray changes them: ``object_store_stats`` raises (ImportError or AttributeError),
so ``jobs/benchmark.py stream`` and ``tests/test_large_corpus.py`` fail before their epoch
starts. ``tests/test_benchmarks.py`` checks every name listed here without starting Ray, so an
upgrade that moves one fails there first, naming it.
"""

from __future__ import annotations

import importlib

import ray

INTERNAL_API = "ray._private.internal_api"
INTERNAL_FUNCTIONS = ("get_state_from_address", "get_memory_info_reply")
REPLY_MODULE, REPLY_MESSAGE = "ray.core.generated.node_manager_pb2", "FormatGlobalMemoryInfoReply"
# Our name -> the ObjectStoreStats field it is read from.
STORE_STATS_FIELDS = {
    "spilled_bytes": "spilled_bytes_total",
    "spilled_objects": "spilled_objects_total",
    "restored_bytes": "restored_bytes_total",
    "fallback_bytes": "object_store_bytes_fallback",
    "used_bytes_now": "object_store_bytes_used",
    "capacity_bytes": "object_store_bytes_avail",
}


def _store_stats_fields() -> set[str]:
    reply = getattr(importlib.import_module(REPLY_MODULE), REPLY_MESSAGE)
    return {f.name for f in reply.DESCRIPTOR.fields_by_name["store_stats"].message_type.fields}


def missing_ray_apis() -> list[str]:
    """The Ray-private names this module reads that the installed Ray does not provide, each
    spelled in full (empty when all are there). Starts no Ray instance."""
    try:
        api = importlib.import_module(INTERNAL_API)
        missing = [f"{INTERNAL_API}.{name}" for name in INTERNAL_FUNCTIONS if not callable(getattr(api, name, None))]
    except ImportError:
        missing = [INTERNAL_API]
    reply = f"{REPLY_MODULE}.{REPLY_MESSAGE}.store_stats"
    try:
        fields = _store_stats_fields()
    except (ImportError, AttributeError, KeyError):
        return missing + [reply]
    return missing + [f"{reply}.{f}" for f in STORE_STATS_FIELDS.values() if f not in fields]


def object_store_stats() -> dict[str, int]:
    """Cumulative object-store figures of the connected Ray cluster, all nodes: bytes spilled to
    disk and restored, and bytes that did not fit and went to the fallback file mapping (what
    ``ray memory --stats-only`` prints); the bytes in use now, and the capacity."""
    # lazy: a Ray that moved this private module must still import this one, so that
    # missing_ray_apis can name what moved.
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    s = reply.store_stats
    return {ours: int(getattr(s, theirs)) for ours, theirs in STORE_STATS_FIELDS.items()}
