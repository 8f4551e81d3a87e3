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
    # Ray workers import the test modules that define helpers passed to them (pickled by reference).
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if tests_dir not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([tests_dir, *filter(None, paths)])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
