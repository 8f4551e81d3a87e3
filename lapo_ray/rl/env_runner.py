"""The env runner of stage 3: RLlib's single-agent env runner with its torch threads set from the
CPUs it was given."""

from __future__ import annotations

import math

import torch
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.annotations import override


def runner_threads(num_cpus: float) -> int:
    """Intra-op threads for a runner holding ``num_cpus`` logical CPUs: their whole number, at
    least one. Fractional shares (0.5 CPU each) get one thread, so N runners on N cores never
    run more busy threads than cores."""
    return max(1, math.floor(num_cpus))


class LapoEnvRunner(SingleAgentEnvRunner):
    """Remote runners (``worker_index`` > 0) run their module's inference on exactly the CPUs
    Ray gave them. Otherwise each runner takes as many threads as the machine has cores, so N
    runners run N times more busy threads than there are cores and their OpenMP threads, waiting
    on each other, slow sampling several-fold (figures: docs/results/rl-notes.md). The local
    runner (index 0) lives in the driver, which sets its own threads."""

    @override(SingleAgentEnvRunner)
    def __init__(self, *, config, **kwargs):
        if (kwargs.get("worker_index") or 0) > 0:
            torch.set_num_threads(runner_threads(config.num_cpus_per_env_runner))
        super().__init__(config=config, **kwargs)
