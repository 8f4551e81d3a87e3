"""The env runner of stage 3: RLlib's single-agent env runner with its torch threads set from the
CPUs it was given."""

from __future__ import annotations

import math

import torch
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner


def runner_threads(num_cpus: float) -> int:
    """Intra-op threads for a runner holding ``num_cpus`` logical CPUs: their whole number, at
    least one. Fractional shares (0.5 CPU each) get one thread, so N runners on N cores never
    run more busy threads than cores."""
    return max(1, math.floor(num_cpus))


class LapoEnvRunner(SingleAgentEnvRunner):
    """Remote runners (``worker_index`` > 0) run their module's inference on exactly the CPUs
    Ray gave them. Without this each runner took as many threads as the machine has cores: on 2
    cores, 2 runners x 2 threads fought over the cores and sampling fell from ~1,860 to 367
    steps/s. The local runner (index 0) lives in the driver, which sets its own threads."""

    def __init__(self, *, config, **kwargs):
        if (kwargs.get("worker_index") or 0) > 0:
            torch.set_num_threads(runner_threads(config.num_cpus_per_env_runner))
        super().__init__(config=config, **kwargs)
