"""Pacing Ray Data's scheduling loop while it spins (``--data.paced-scheduling``, on by default).

When the consumer (a training step) is the bottleneck, Ray Data's streaming executor is
backpressured: it has no task to wait on, or only tasks whose output it may not read yet, so each
scheduling step returns in a few milliseconds having changed nothing, and the loop spins. The
executor offers no public signal for "made progress" or "backpressured", so this callback reads
two internals of ``StreamingExecutor`` (``_topology``'s per-operator metrics and queues, and
``_consumer_idling()``); ``tests/test_data.py`` runs it against the real executor, so a Ray
upgrade that moves them fails a test instead of silently turning pacing off.

What would let this module go: the scheduling loop blocking (on a condition variable signalled by
task completion, a consumer pull or a resource change) instead of polling when every operator is
backpressured, or a public progress/idle hook on ``ExecutionCallback``. Neither exists in
Ray 2.60.
"""

from __future__ import annotations

import logging
import time

# The callback interface of Ray Data's executor (a developer API; public in name only).
from ray.data._internal.execution.execution_callback import ExecutionCallback

logger = logging.getLogger(__name__)


class PacedScheduling(ExecutionCallback):
    """A Ray Data execution callback that slows the streaming executor's scheduling loop only
    while it spins, and backs off the longer it spins.

    When the consumer (a training step) is the bottleneck, the executor is backpressured: it has
    no task to wait on, or only tasks whose output it may not read yet, so each step returns in
    a few milliseconds having changed nothing, and the loop spins, taking a core's share from the
    training step it waits on. A fixed pause short enough not to starve a fast consumer still
    left much of that spin, and one long enough to stop it starved a fast consumer
    (docs/results/choices.md).

    So a step counts as spinning when it took under ``spin_s`` (a step with tasks in flight
    waits up to 0.1 s in ``ray.wait``), the consumer still has output to read, and no counter of
    progress moved (tasks submitted or finished, blocks produced, blocks waiting in any queue).
    Each spinning step doubles the pause, from ``min_pause_s`` up to ``max_pause_s``; any
    progress, a slow step or a waiting consumer drops it to zero, so a pipeline that keeps up
    with a fast consumer is never slowed.
    """

    spin_s = 0.05
    min_pause_s = 0.01
    max_pause_s = 0.5

    _warned = False  # once per process: the internals are the same for every executor

    def __init__(self):
        super().__init__()
        self._last = None
        self._pause = 0.0
        self._progress = None

    def before_execution_starts(self, executor) -> None:
        self._last = time.perf_counter()

    @staticmethod
    def _progress_of(executor) -> tuple | None:
        """Counters that move whenever the executor does useful work; ``None`` if this Ray
        version's executor does not expose them (the pause then depends on timing alone)."""
        try:
            return tuple(
                (op.metrics.num_tasks_submitted, op.metrics.num_tasks_finished,
                 op.metrics.num_task_outputs_generated, state.output_queue.num_blocks,
                 sum(q.num_blocks for q in state.input_queues))
                for op, state in executor._topology.items()
            )
        except (AttributeError, TypeError):
            return None

    @staticmethod
    def _consumer_waiting(executor) -> bool:
        try:
            return bool(executor._consumer_idling())
        except AttributeError:
            return False

    def on_execution_step(self, executor) -> None:
        now = time.perf_counter()
        progress = self._progress_of(executor)
        if progress is None and not PacedScheduling._warned:
            PacedScheduling._warned = True
            logger.warning("lapo_ray: this Ray version's StreamingExecutor hides its progress counters; "
                           "scheduling is paced by step timing alone (--data.paced-scheduling false turns "
                           "pacing off)")
        spinning = (self._last is not None and now - self._last < self.spin_s
                    and progress == self._progress and not self._consumer_waiting(executor))
        self._progress = progress
        if spinning:
            self._pause = min(max(2 * self._pause, self.min_pause_s), self.max_pause_s)
            time.sleep(self._pause)
        else:
            self._pause = 0.0
        self._last = time.perf_counter()


def pace_scheduling(ctx, enabled: bool = True) -> None:
    """Attach (or detach) the pacing callback on a dataset's ``DataContext``; the context travels
    with the dataset to Ray Train's SplitCoordinator and to every worker's iterator."""
    classes = ctx.custom_execution_callback_classes
    if enabled and PacedScheduling not in classes:
        classes.append(PacedScheduling)
    elif not enabled and PacedScheduling in classes:
        classes.remove(PacedScheduling)
