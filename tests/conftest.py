import os

import pytest

# Procgen imports gym, which prints a deprecation banner; keep test output readable.
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray instance for one test module (the size of this project's CI machine)."""
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
