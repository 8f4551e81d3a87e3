import contextlib
import fcntl
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

# Procgen imports gym, which prints a deprecation banner; keep test output readable.
os.environ.setdefault("PYTHONWARNINGS", "ignore")

# Ray 2.60 turns token authentication on for every local cluster and, when no token exists,
# writes one to ~/.ray/auth_token. The suite brings its own token, set before Ray is imported,
# so it neither depends on nor writes the user's ~/.ray; every head, driver and CLI call the
# tests start inherits it.
_TOKEN_DIR = tempfile.mkdtemp(prefix="lapo-ray-token-")
os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(_TOKEN_DIR, "auth_token")
with open(os.environ["RAY_AUTH_TOKEN_PATH"], "w") as _f:
    _f.write(secrets.token_hex(32))
os.environ.pop("RAY_AUTH_TOKEN", None)

# Ray Train's controller polls its workers every 2 s, so every stage the suite trains ended up to
# 2 s after its last step (3.8 s from the last step to fit()'s return measured, 0.9 s at 0.2 s);
# the suite trains about 25 stages. Inherited by every Ray Train controller the tests start,
# jobs submitted to test heads included. Jobs keep Ray's default: 2 s is nothing to a real run.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# And every Ray Train run starts a PreemptionWatcher actor, a process of its own that imports Ray
# and polls the node's drain state; no test drains a node (node loss is a kill).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


# pytest-xdist runs the suite in two worker processes (pyproject's addopts), whole files each.
# Every worker gets a Ray temp folder of its own: ray.init() joins the cluster whose address it
# finds in RAY_TMPDIR's ray_current_cluster, and one worker's head must not be the other's.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"lr{_WORKER}-", dir="/tmp")  # short: socket paths
# What the workers share: a folder named by the run (the controller names it, below), for the
# locks and the one pretraining run they all read.
_SUITE_DIR = Path(tempfile.gettempdir()) / f"lapo-suite-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"


def pytest_configure(config):
    global _SUITE_DIR
    if not _WORKER and getattr(config.option, "numprocesses", None):
        config.option.testrunuid = config.option.testrunuid or uuid.uuid4().hex
        _SUITE_DIR = _SUITE_DIR.with_name(f"lapo-suite-{config.option.testrunuid}")
    _SUITE_DIR.mkdir(exist_ok=True)


def pytest_unconfigure(config):
    if not _WORKER:  # the controller, or a run without workers: the last to finish
        shutil.rmtree(_SUITE_DIR, ignore_errors=True)


@contextlib.contextmanager
def _flock(name: str, exclusive: bool):
    fd = os.open(_SUITE_DIR / name, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def machine_share(alone: bool):
    """Slow work holds the machine shared; a test marked `alone` holds it by itself. Alone tests
    are the README's head, on Ray's fixed default ports that any other local Ray instance's
    dashboard may take, and the memory test, whose buffers' level moved 89 MiB with another Ray
    instance beside it. The gate gives a waiting alone test the next turn: without it, the other
    worker's tests, one after another, could hold the machine for the rest of the run."""
    if not _WORKER:
        yield
        return
    with contextlib.ExitStack() as held:
        with _flock("gate", exclusive=True):
            held.enter_context(_flock("machine", exclusive=alone))
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A slow test holds the machine from its setup to its teardown (the module fixtures it
    starts or ends included); one marked `alone` holds it by itself. Between tests a module's
    fixtures stay up without the lock: none of them sits on a fixed port (ray_local and the
    multinode clusters start no dashboard, the job head takes free ports)."""
    if item.get_closest_marker("slow") is None:
        return (yield)
    with machine_share(alone=item.get_closest_marker("alone") is not None):
        return (yield)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: with other processes on a 2-core box, OpenMP threads spinning
    at barriers made steps 10-30x slower than one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_SHARED_RAY: dict[str, str | None] = {"address": None}


@contextlib.contextmanager
def _agent_on_any_port():
    """Even without a dashboard, a node's dashboard agent listens on Ray's fixed default port
    52365, and ray.init() has no argument to move it. The shared instance stays up between tests,
    where the other xdist worker's README test starts a head on the default ports: its agent could
    not bind 52365, and the head answered "No available agent to submit job" for two minutes.
    So the shared instance's agent takes any free port (0), as the multinode clusters' do."""
    from ray._private.parameter import RayParams

    init = RayParams.__init__

    def any_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        init(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RayParams, "__init__", any_port)
        yield


@pytest.fixture(scope="module")
def ray_local(request):
    """A local 2-CPU Ray instance (the size of this project's CI machine), shared by the modules
    that ask for it: started by the first, kept for the next, and started anew only when a module
    in between joined a cluster of its own (test_cluster_ops, test_multinode). A start and a
    shutdown cost about 8 s here; nine modules use it. Shut down when the session ends."""
    import ray
    from ray.data import DataContext

    if ray.is_initialized() and ray.get_runtime_context().gcs_address == _SHARED_RAY["address"]:
        yield ray
        return
    if ray.is_initialized():
        ray.shutdown()
    # Ray workers import the test modules that define helpers passed to them (pickled by reference).
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if tests_dir not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([tests_dir, *filter(None, paths)])
    from lapo_ray.runtime import job_env

    # The settings every lapo_ray job runs with (one Parquet footer actor per listing, ...),
    # inherited by this instance's raylet and so by every worker.
    for key, value in job_env().items():
        os.environ.setdefault(key, value)
    with _agent_on_any_port():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    _SHARED_RAY["address"] = ray.get_runtime_context().gcs_address
    request.session.config.add_cleanup(ray.shutdown)
    yield ray


REPO = Path(__file__).resolve().parents[1]

# The flags of the shared pretraining run: every stage, a few steps each, the probe with its
# ceiling, wandb offline.
PRETRAINED_FLAGS = ["--stages", "stage1,label,stage2", "--probe.triplets", "2000", "--probe.during-training", "0",
                    "--probe.max-epochs", "5", "--probe.patience", "2", "--data.val-fraction", "0.2",
                    "--data.local-shuffle-buffer", "0", "--data.global-shuffle", "none", "--wandb.mode", "offline"]
for _stage in ("stage1", "stage2"):
    PRETRAINED_FLAGS += [f"--{_stage}.batch-size", "16", f"--{_stage}.steps", "4", f"--{_stage}.warmup-steps", "1",
                         f"--{_stage}.report-every", "2", f"--{_stage}.checkpoint-every", "4",
                         f"--{_stage}.val-batches", "1", f"--{_stage}.precision", "fp32"]


@pytest.fixture(scope="session")
def pretrained_run():
    """One small pretraining job, made once per pytest run for every test that needs a trained
    run (labelling, wandb's records of a job), by whichever xdist worker asks first, the other
    waiting for it: `python jobs/pretrain.py` with PRETRAINED_FLAGS on a LAPO npz corpus of
    2 x 130 frames, in a process of its own with its own local Ray instance and HOME an empty
    folder, as a user on a new machine runs it. Tests read the folder and never write into it.
    Returns {"out", "corpus", "home", "console"} (console: the job's stdout and stderr)."""
    base = _SUITE_DIR / "pretrained"
    with _flock("pretrained.lock", exclusive=True):
        if not (base / "console.txt").exists():  # made inside a slow test, which holds the machine
            _pretrain_once(base)
    return {"out": base / "job-42", "corpus": base / "npz", "home": base / "home",
            "console": (base / "console.txt").read_text()}


def _pretrain_once(base: Path) -> None:
    from test_data import write_lapo_npz

    shutil.rmtree(base, ignore_errors=True)  # what a failed try left
    write_lapo_npz(base / "npz", n_files=2, n=130)
    home = base / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="lr-", dir="/tmp")  # short: Unix socket paths live below it
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "RAY_ADDRESS"}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"), RAY_TMPDIR=ray_tmp)
    try:
        r = subprocess.run([sys.executable, "jobs/pretrain.py", "--corpus", str(base / "npz"),
                            "--out", str(base / "job-42"), *PRETRAINED_FLAGS],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, f"the shared pretraining run failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    (base / "console.txt").write_text(r.stdout + r.stderr)


_HOME_RAY = os.path.join(os.path.expanduser("~"), ".ray")
_HAD_HOME_RAY = os.path.exists(_HOME_RAY)


def pytest_sessionfinish(session, exitstatus):
    """The suite must leave the user's ~/.ray alone (CI runs it with HOME an empty folder, where
    a written token would make the next run on that machine pass for the wrong reason)."""
    if not _HAD_HOME_RAY and os.path.exists(os.path.join(_HOME_RAY, "auth_token")):
        session.config.get_terminal_writer().line(
            f"FAILED: the test suite wrote {_HOME_RAY}/auth_token; tests must use RAY_AUTH_TOKEN_PATH", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The fast tier (`pytest -m "not slow"`) leaves out every test that starts Ray, builds an RLlib
# algorithm or trains for more than a few steps. The first two are checked here rather than left
# to memory: a test that asks for a Ray fixture, or leaves Ray running when it did not find it
# so, fails unless it is marked slow.
_RAY_FIXTURES = {"ray_local"}


# pytest-xdist (--dist loadfile) hands each worker the next whole file, in collection order, when
# it runs short of work. In name order the longest files came last (test_train, test_sweep), so one
# worker ran a long file while the other sat idle: files are handed out longest first (the per-file
# totals in docs/testing.md), the rest keep their order after them, and so do a file's own tests.
# test_probe_job goes second: it makes the shared pretraining run that test_label and test_wandb
# wait for. Files named on the command line keep the order they are given in (a run in reverse
# order checks that no test leans on one before it).
LONGEST_FIRST = ("test_cluster_ops", "test_probe_job", "test_train", "test_multinode", "test_sweep", "test_rl",
                 "test_label", "test_multi_corpus", "test_large_corpus", "test_data")


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if _RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("these tests start Ray but are not marked slow:\n  " + "\n  ".join(unmarked))
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _fast_tests_leave_ray_alone(request):
    ray = sys.modules.get("ray")
    before = bool(ray and ray.is_initialized())
    yield
    ray = sys.modules.get("ray")
    if not before and ray and ray.is_initialized() and request.node.get_closest_marker("slow") is None:
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray but is not marked slow", pytrace=False)
