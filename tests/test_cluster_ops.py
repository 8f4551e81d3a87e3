"""Cluster operations, for real: remote storage, telemetry, autoscaling, job submission.

The cluster tests start their own Ray heads with `ray start` on unused ports and in their own temp
folder, and end them by killing exactly the processes of that folder. `ray stop` is not used: it
kills every Ray process of the user on the machine, including clusters that are not ours.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray  # noqa: F401  (first: it puts its vendored psutil on sys.path)
import psutil
import torch

from lapo_ray import storage, telemetry
from lapo_ray.config import CollectConfig, WandbConfig
from lapo_ray.data.collect import existing_worker_state
from lapo_ray.data.corpus import Episode, read_manifest, write_corpus
from lapo_ray.data.sources import CorpusSource, open_source
from lapo_ray.data.triplets import SplitSpec, iter_plain_batches
from lapo_ray.train.checkpoint import Checkpoint, save_checkpoint
from lapo_ray.train.metrics import MetricsSink, read_metrics
from test_jobs import library_lines

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
SHAPE = (8, 8, 3)


# --------------------------------------------------------------------------- remote storage


def _episode(eid: int, length: int) -> Episode:
    """Frames that carry (episode, step) in their pixels, so a triplet can be checked exactly."""
    f = np.zeros((length, *SHAPE), np.uint8)
    f[:, 0, 0, 0] = np.arange(length) % 256
    f[:, 0, 0, 1] = np.arange(length) // 256
    f[:, 0, 0, 2] = eid
    return Episode(eid, f, actions=np.arange(length, dtype=np.int64))


@pytest.fixture(params=["memory", "file-uri", "fsspec-local"])
def root(request, tmp_path):
    """A storage root that is not a plain local path: fsspec's in-memory filesystem, a file://
    URI (pyarrow's native filesystem from a URI) and fsspec's local filesystem behind pyarrow's
    PyFileSystem (the route every fsspec-only protocol takes). memory:// lives in one process, so
    the Ray side (actors, Ray Data, Ray Train) is tried with file:// and local:// in the job test."""
    if request.param == "memory":
        import fsspec

        name = f"lapo-{uuid.uuid4().hex[:8]}"
        yield f"memory://{name}"
        fsspec.filesystem("memory").rm(f"/{name}", recursive=True)
    elif request.param == "file-uri":
        yield f"file://{tmp_path}"
    else:
        yield f"local://{tmp_path}"


def test_storage_writes_are_atomic_and_errors_name_the_uri(root):
    fs, _ = storage.resolve(root)
    assert not isinstance(fs, pafs.LocalFileSystem) or root.startswith("file://")
    uri = storage.join(root, "a", "config.json")
    storage.write_json(uri, {"x": [1, 2]})
    assert storage.read_json(uri) == {"x": [1, 2]}

    # A writer that fails halfway leaves neither the file nor its temporary sibling behind.
    half = storage.join(root, "a", "half.bin")
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.atomic_output(half) as out:
            out.write(b"partial")
            raise RuntimeError("disk full")
    assert not storage.exists(half)
    assert [os.path.basename(p) for p in storage.list_files(storage.join(root, "a"))] == ["config.json"]

    log = storage.join(root, "a", "metrics.jsonl")
    for i in range(3):
        storage.append_line(log, json.dumps({"step": i}))
    assert storage.read_bytes(log).decode().splitlines() == ['{"step": 0}', '{"step": 1}', '{"step": 2}']

    missing = storage.join(root, "nope.json")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: no such file")):
        storage.read_json(missing)
    storage.write_bytes(missing, b"{broken")
    with pytest.raises(ValueError, match=re.escape(f"{missing}: not valid JSON")):
        storage.read_json(missing)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        storage.list_files(storage.join(root, "no-dir"))


def test_uri_options_survive_joins():
    """Options in a URI's query (an S3-compatible endpoint such as MinIO) apply to every file under it."""
    base = "s3://bucket/runs/a?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1"
    uri = storage.join(base, "stage1", "state.json")
    assert uri == "s3://bucket/runs/a/stage1/state.json?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1"
    fs, path = storage.resolve(uri)
    assert (type(fs).__name__, path) == ("S3FileSystem", "bucket/runs/a/stage1/state.json")
    assert storage.join("/data/runs", "stage1") == "/data/runs/stage1"


def test_corpus_round_trip_on_remote_storage(root):
    lengths = [40, 300, 3, 17, 129]
    corpus = storage.join(root, "corpus")
    manifest = write_corpus(corpus, [_episode(i, n) for i, n in enumerate(lengths)], "coinrun",
                            shard_frames=200, max_segment_frames=64)
    expected_triplets = sum(n - 2 for n in lengths)
    assert (manifest.num_frames, manifest.num_episodes, manifest.num_triplets) == (sum(lengths), 5, expected_triplets)
    assert read_manifest(corpus) == manifest
    shards = storage.list_files(storage.join(corpus, "shards"), suffix=".parquet")
    assert [os.path.basename(s) for s in shards] == ["w000-00000.parquet", "w000-00001.parquet"]

    source = open_source(corpus)
    assert isinstance(source, CorpusSource)
    scan = source.scan()
    assert (len(scan.files), scan.triplets, scan.bad_files) == (2, expected_triplets, [])
    seen = []
    for b in iter_plain_batches(source, "all", 32, SplitSpec(0.0)):
        for e, s, fr in zip(b["episode_id"], b["step"], b["frames"]):
            assert fr[:, 0, 0, 2].tolist() == [e] * 3
            assert (fr[:, 0, 0, 0].astype(int) + 256 * fr[:, 0, 0, 1].astype(int)).tolist() == [s - 1, s, s + 1]
            seen.append((int(e), int(s)))
    assert sorted(seen) == [(e, t) for e, n in enumerate(lengths) for t in range(1, n - 1)]
    # What an interrupted collection reads back to resume: frames written and the next shard.
    assert existing_worker_state(corpus, 0) == (sum(lengths), 2, 5)


def _tiny_model(seed: int) -> torch.nn.Module:
    from lapo_ray.config import PRETRAIN_PRESETS
    from lapo_ray.models import LatentDynamics

    torch.manual_seed(seed)
    return LatentDynamics(PRETRAIN_PRESETS["cpu"]().model)


def test_checkpoints_on_remote_storage(root, tmp_path):
    from lapo_ray.config import PRETRAIN_PRESETS
    from lapo_ray.train.checkpoint import load_dynamics

    run_config = PRETRAIN_PRESETS["cpu"]().to_dict()
    stage = storage.join(root, "stage1")
    fs, stage_path = storage.resolve(stage)
    assert Checkpoint.latest(stage) is None
    models = {}
    for name, step in [("checkpoint_000000", 3), ("checkpoint_000001", 7), ("checkpoint_000002", 5)]:
        local = tmp_path / "local" / name
        models[step] = _tiny_model(step)
        save_checkpoint(str(local), models[step], None, {"step": step, "done": step == 7}, run_config)
        fs.create_dir(f"{stage_path}/{name}", recursive=True)
        pafs.copy_files(str(local), f"{stage_path}/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    # A checkpoint still being uploaded (no state.json yet) is never picked, however new.
    fs.create_dir(f"{stage_path}/checkpoint_000003")
    with fs.open_output_stream(f"{stage_path}/checkpoint_000003/model.pt") as f:
        f.write(b"partial")

    best = Checkpoint.latest(stage)
    assert best.uri == storage.join(stage, "checkpoint_000001")
    assert json.loads(storage.read_bytes(f"{best.uri}/state.json")) == {"step": 7, "done": True}
    assert (best.step, best.done, best.model_config()) == (7, True, PRETRAIN_PRESETS["cpu"]().model)
    assert Checkpoint.finished(stage).uri == best.uri
    loaded = load_dynamics(best.uri)
    for k, v in models[7].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_artifacts_on_remote_storage(root):
    from lapo_ray.pipelines.pretrain import save_curves, write_report

    out = storage.join(root, "run")
    sink = MetricsSink(out, "stage1", WandbConfig(mode="disabled"), {})
    rows = [{"step": s, "train/loss": 1.0 / s, "samples_per_s": 100.0 + s, "world_size": 1, "data_wait_frac": 0.1}
            for s in (5, 10)]
    for r in rows:
        sink.log(r)
    sink.finish()
    got = read_metrics(out, "stage1")
    assert [(r["step"], r["train/loss"]) for r in got] == [(5, 0.2), (10, 0.1)]
    png = save_curves(out, got)
    assert storage.read_bytes(png)[:8] == b"\x89PNG\r\n\x1a\n"
    write_report(out, {"source": {"name": "corpus:x", "frames": 1000, "episodes": 4, "triplets": 992}}, got)
    report = storage.read_bytes(storage.join(out, "report.md")).decode()
    assert "step 10, 110 samples/s (1 worker(s))" in report
    assert sorted(os.path.basename(p) for p in storage.list_files(out)) == ["metrics.jsonl", "report.md"]


# --------------------------------------------------------------------------- telemetry (no Ray)


def test_telemetry_checks_names_and_tags_and_is_silent_outside_ray(monkeypatch):
    import ray

    monkeypatch.setattr(telemetry, "_instances", {})
    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(KeyError, match="unknown telemetry metric 'frames_colected'; known: .*frames_collected"):
        telemetry.count("frames_colected", 5, {"game": "coinrun"})
    with pytest.raises(ValueError, match=r"takes tags \['game'\], got \['env'\]"):
        telemetry.count("frames_collected", 5, {"env": "coinrun"})
    with pytest.raises(TypeError, match="'train_samples_per_s' is a gauge, not a counter"):
        telemetry.count("train_samples_per_s", 5, {"stage": "stage1", "rank": "0"})
    telemetry.count("frames_collected", 5, {"game": "coinrun"})
    telemetry.gauge("env_steps_per_s", 123.0, {"component": "env_runner"})
    assert telemetry._instances == {}  # nothing was handed to Ray's metrics outside Ray


# --------------------------------------------------------------------------- local clusters


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ip() -> str:
    from ray.util import get_node_ip_address

    return get_node_ip_address()


class LocalHead:
    """A head started with `ray start --head` like the README says, on its own ports and temp
    folder; `stop` kills the processes of that folder (and their children), nothing else."""

    def __init__(self, num_cpus: int, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        # Short: Ray's unix socket paths under it must stay below 108 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="lr-", dir="/tmp")
        self.gcs_port, self.dashboard_port, agent, client, self.metrics_port = _free_ports(5)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.args = [
            RAY, "start", "--head", "--dashboard-host", "127.0.0.1", f"--num-cpus={num_cpus}",
            f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
            f"--metrics-export-port={self.metrics_port}", f"--temp-dir={self.temp_dir}",
            "--object-store-memory=200000000", *extra_args,
        ]

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{_node_ip()}:{self.gcs_port}"

    def start(self) -> None:
        try:
            r = subprocess.run(self.args, env=self.env, capture_output=True, text=True, timeout=120)
        except BaseException:
            self.stop()
            raise
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")

    def cli(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)

    def processes(self) -> list[psutil.Process]:
        # Most processes name the temp folder; the Ray client proxy only names the GCS address.
        ours = re.compile(rf"{re.escape(self.temp_dir)}|{re.escape(self.gcs_address)}(?!\d)")
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if ours.search(" ".join(p.info["cmdline"] or ())):
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        found[c.pid] = c
            except psutil.Error:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _connect(address: str):
    """Join a token-protected cluster from this process (as `RAY_AUTH_MODE=token` would)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _token_auth()
    ray.init(address=address, log_to_driver=False)
    return ray


# --------------------------------------------------------------------------- autoscaling


def _fake_cluster_config(gcs_address: str, head_cpus: int, worker_cpus: int, max_workers: int,
                         idle_timeout_minutes: float) -> dict:
    """The autoscaler config of Ray's fake multi-node provider (nodes are process groups on this
    machine), as `ray.cluster_utils.AutoscalingCluster` builds it; the wheel lacks the example
    YAML that class reads, so it is spelled out here."""
    return {
        "cluster_name": "lapo-fake",
        "max_workers": max_workers,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": worker_cpus, "object_store_memory": 100 * 1024**2},
                           "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.mark.slow
def test_autoscaler_adds_nodes_for_rollout_actors_and_removes_idle_ones(tmp_path):
    """Three 1-CPU collection actors on a 1-CPU head: the autoscaler must add two worker nodes,
    the collection must finish on them, and the idle nodes must go after the idle timeout."""
    from lapo_ray.data.collect import collect

    head = LocalHead(num_cpus=1, env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    config_path = Path(head.temp_dir) / "autoscaler.json"
    config_path.write_text(json.dumps(_fake_cluster_config(head.gcs_address, head_cpus=1, worker_cpus=1,
                                                           max_workers=2, idle_timeout_minutes=0.05)))
    head.args += [f"--autoscaling-config={config_path}", "--include-dashboard=true"]
    head.start()
    samples: list[tuple[float, int]] = []
    watching = threading.Event()
    try:
        ray = _connect(head.gcs_address)
        head_id = ray.get_runtime_context().get_node_id()

        def watch():
            while not watching.is_set():
                samples.append((time.monotonic(), sum(n["Alive"] for n in ray.nodes())))
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cfg = CollectConfig(out=str(tmp_path / "corpus"), game="coinrun", frames=3 * 300, num_workers=3,
                            envs_per_worker=2, worker_num_cpus=1.0, shard_frames=10_000)
        t0 = time.monotonic()
        manifest = collect(cfg, progress_interval=60)
        collected_s = time.monotonic() - t0
        assert manifest.num_frames == 900
        assert [s.path for s in manifest.shards] == [f"shards/w00{i}-00000.parquet" for i in range(3)]

        from ray.util.state import list_actors

        actors = list_actors(address=head.dashboard, filters=[("class_name", "=", "Collector")], detail=True)
        placed = {a.name: a.node_id for a in actors}
        assert sorted(placed) == ["collector-coinrun-0", "collector-coinrun-1", "collector-coinrun-2"]
        assert len(set(placed.values())) == 3, placed
        assert sum(node != head_id for node in placed.values()) == 2, placed
        assert max(n for _, n in samples) == 3, samples

        # Idle nodes go: 3 s idle timeout plus the autoscaler's 1 s update interval.
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) > 1:
            assert time.monotonic() < deadline, f"idle worker nodes were not removed: {ray.nodes()}"
            time.sleep(0.5)
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        assert alive == [head_id]
        print(f"collection on 3 nodes took {collected_s:.1f}s; idle nodes gone "
              f"{time.monotonic() - t0 - collected_s:.1f}s after it")
    finally:
        watching.set()
        import ray as _ray

        _ray.shutdown()
        head.stop()


# --------------------------------------------------------------------------- job submission


# Polling goes through Ray's Python clients: each `ray` CLI call costs ~1.5 CPU-seconds of imports,
# which a 2-core machine running the job cannot spare. Submitting and stopping use the CLI.


def _token_auth() -> None:
    """Send the token like a client with RAY_AUTH_MODE=token (read from ~/.ray/auth_token)."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray caches its config at import; re-read the auth mode


def _jobs_client(head: LocalHead):
    from ray.job_submission import JobSubmissionClient

    _token_auth()
    return JobSubmissionClient(head.dashboard)


def _job_status(head: LocalHead, job: str) -> str:
    return _jobs_client(head).get_job_status(job).value


def _wait_job(head: LocalHead, job: str, timeout: float, until=("SUCCEEDED", "FAILED", "STOPPED")) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = _job_status(head, job)
        if status in until or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _job_logs(head: LocalHead, job: str) -> str:
    return _jobs_client(head).get_job_logs(job)


def _job_id(head: LocalHead, job: str) -> str:
    return _jobs_client(head).get_job_info(job).job_id


def _submit(head: LocalHead, job: str, *args: str) -> None:
    r = head.cli("job", "submit", "--address", head.dashboard, "--working-dir", str(REPO),
                 "--submission-id", job, "--no-wait", "--", "python", "jobs/pretrain.py", *args, timeout=120)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"


def _actors(head: LocalHead, *filters: tuple[str, str, str]) -> list:
    from ray.util.state import list_actors

    _token_auth()
    return list_actors(address=head.dashboard, filters=list(filters), detail=True, limit=10_000)


def _placement_groups(head: LocalHead, *filters: tuple[str, str, str]) -> list:
    from ray.util.state import list_placement_groups

    _token_auth()
    return list_placement_groups(address=head.dashboard, filters=list(filters), detail=True, limit=10_000)


def _prometheus(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels`` (None if there is none)."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
            found = True
    return total if found else None


def readme_local_cluster_commands() -> list[str]:
    """The README's local-cluster block, one shell command per entry (continuations joined)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running on a Ray cluster"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[: block.index("```")]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


class ReadmeHead(LocalHead):
    """The README's head: Ray's default GCS port on 127.0.0.1. Its client-server proxy names only
    that address in its command line, so this is what finds (and stops) it."""

    gcs_address = "127.0.0.1:6379"


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket the given processes own."""
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            found.append((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
    return found


@pytest.mark.slow
@pytest.mark.alone
def test_readme_local_cluster_commands_work_verbatim_on_a_fresh_machine(tmp_path):
    """HOME is an empty folder (no token, no Ray history); the README's commands, run as they are
    written, make a token, start a head that listens on loopback only, and run the job."""
    commands = readme_local_cluster_commands()
    assert [c.split()[:3] for c in commands[:2]] == [["ray", "get-auth-token", "--generate"],
                                                     ["export", "RAY_AUTH_MODE=token"]], commands
    assert "ray start --head" in commands[2] and commands[3].startswith("ray job submit"), commands
    for port in (6379, 8265, 8080, 10001):  # the README uses Ray's default ports; say so if one is taken
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, (
                f"port {port} is taken by another process; the README's head needs it (stop other Ray "
                "instances on this machine first)")
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="lr-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    work = tmp_path / "work"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".git", "artifacts", "data", "wandb", "__pycache__"))
    # The job's own flags are the README's, with a tiny budget added after them.
    job = commands[3] + " " + " ".join([*TINY, "--stages", "stage1"])
    script = "set -e\n" + "\n".join(commands[:3]) + "\n"
    head = ReadmeHead(num_cpus=2)
    head.temp_dir = ray_tmp  # so that stop() finds and ends exactly this head's processes
    try:
        r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert (home / ".ray" / "auth_token").is_file()

        def check_loopback_only() -> None:
            sockets = _listening({p.pid for p in head.processes()})
            exposed = [s for s in sockets if not ipaddress.ip_address(s[0].removeprefix("::ffff:")).is_loopback]
            assert not exposed, f"listening beyond loopback: {exposed}"
            ports = {p for _, p, _ in sockets}
            assert {6379, 8265, 8080, 10001} <= ports, sockets  # GCS, dashboard, metrics, client server

        # Some of the head's servers come up after `ray start` returns (the dashboard and the
        # client server take seconds on a busy machine): look once they answer, and again later.
        deadline = time.monotonic() + 90
        while True:
            try:
                check_loopback_only()
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

        # The head's job agent registers some seconds after `ray start` returns; until then the
        # dashboard answers "No available agent to submit job, please try again later" and
        # creates no job, so a person (and this test) simply runs the command again.
        deadline = time.monotonic() + 120
        while True:
            r = subprocess.run(["bash", "-c", f"export RAY_AUTH_MODE=token\n{job}"], cwd=work, env=env,
                               capture_output=True, text=True, timeout=420)
            if "No available agent to submit job" not in r.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout + r.stderr
        check_loopback_only()  # with the job's workers, actors and agents started too
        rows = read_metrics(str(work / "artifacts" / "pretrain"))
        assert [(row["stage"], row["step"], row["done"]) for row in rows] == [("stage1", 5, True)]
        # Without the token the head refuses the same client.
        env_no_token = {k: v for k, v in env.items()}
        env_no_token["HOME"] = str(tmp_path)
        r = subprocess.run(["bash", "-c", "RAY_AUTH_MODE=token ray job list --address http://127.0.0.1:8265"],
                           cwd=work, env=env_no_token, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
    finally:
        head.stop()


@pytest.fixture(scope="module")
def job_head():
    """One head for every `ray job submit` test of the suite (the README's own commands start
    theirs, on Ray's default ports, as the README says)."""
    head = LocalHead(num_cpus=2)
    head.start()
    try:
        yield head
    finally:
        head.stop()


TINY = [
    "--collect.frames", "1200", "--collect.num-workers", "1", "--collect.envs-per-worker", "4",
    "--label.num-actors", "1", "--probe.triplets", "0", "--wandb.mode", "disabled",
    "--data.local-shuffle-buffer", "0",
]
for _stage in ("stage1", "stage2"):
    TINY += [f"--{_stage}.steps", "5", f"--{_stage}.batch-size", "16", f"--{_stage}.warmup-steps", "1",
             f"--{_stage}.report-every", "5", f"--{_stage}.checkpoint-every", "5", f"--{_stage}.val-batches", "0",
             f"--{_stage}.precision", "fp32"]


@pytest.mark.slow
def test_job_api_refuses_a_wrong_token(job_head):
    r = job_head.cli("job", "list", "--address", job_head.dashboard, env={"RAY_AUTH_TOKEN": "0" * 64})
    assert r.returncode != 0
    assert "Authentication" in r.stdout + r.stderr or "401" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.slow
def test_job_submission_runs_pretrain_to_remote_storage(job_head, tmp_path_factory):
    """`ray job submit --working-dir .` of jobs/pretrain.py on a token-protected head: the job
    succeeds, writes every artifact through a storage URI, names its actors, exports its counters."""
    base = tmp_path_factory.getbasetemp()
    corpus, out = f"file://{base}/job-corpus", f"local://{base}/job-artifacts"
    job = f"lapo-pretrain-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    _submit(job_head, job, "--collect.out", corpus, "--out", out, *TINY)
    status = _wait_job(job_head, job, timeout=420)
    logs = _job_logs(job_head, job)
    assert status == "SUCCEEDED", f"job ended {status} after {time.monotonic() - t0:.0f}s:\n{logs[-6000:]}"
    progress = [line for line in logs.splitlines() if "] step " in line]
    assert progress and len(progress) == len(set(progress)), f"progress lines repeated:\n{progress}"
    # The console is the job's own progress, not Ray's commentary; the job supervisor's line
    # before the job starts ("Runtime env is setting up") is the head's, not the job's.
    assert [line for line in library_lines(logs) if "job_manager.py" not in line] == []

    m = read_manifest(corpus)
    assert m.num_frames == 1200
    art = f"{base}/job-artifacts"
    cfg = json.load(open(f"{art}/config.json"))
    assert (cfg["out"], cfg["collect"]["out"], cfg["stage1"]["steps"]) == (out, corpus, 5)
    rows = read_metrics(out)
    assert [(r["stage"], r["step"], r["done"]) for r in rows] == [("stage1", 5, True), ("stage2", 5, True)]
    for stage in ("stage1", "stage2"):
        ckpt = Checkpoint.latest(storage.join(out, stage))
        assert ckpt is not None and ckpt.uri.startswith(f"local://{art}/{stage}/checkpoint_"), ckpt
        assert ckpt.step == 5 and ckpt.done
        assert {"model.pt", "optimizer.pt", "config.json"} <= set(os.listdir(ckpt.uri[len("local://"):]))
    latents = json.load(open(f"{art}/latents/manifest.json"))
    assert latents["rows"] == m.num_triplets  # every triplet centre of the corpus labelled once
    report = open(f"{art}/report.md").read()
    assert f"({m.num_frames:,} frames" in report and "## stage2" in report
    assert open(f"{art}/plots/training_curves.png", "rb").read(4) == b"\x89PNG"

    # The upload is the code only: .gitignore and .rayignore keep data, artifacts and .git out.
    pkgs = [p for p in Path(job_head.temp_dir).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
            if p.is_dir()]
    assert len(pkgs) == 1, pkgs
    names = {p.name for p in pkgs[0].iterdir()}
    assert {"lapo_ray", "jobs", "pyproject.toml"} <= names and not names & {".git", "data", "artifacts", "wandb"}
    size = sum(f.stat().st_size for f in pkgs[0].rglob("*") if f.is_file())
    assert size < 5 * 1024**2, f"working_dir upload is {size / 1024**2:.1f} MiB"

    # The dashboard's Train view: both stages as runs of Ray Train's state API, finished.
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    req = urllib.request.Request(f"{job_head.dashboard}/api/train/v2/runs/v1",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        runs = json.loads(resp.read())["train_runs"]
    assert {(r["name"], r["status"]) for r in runs if r["job_id"] == _job_id(job_head, job)} == {
        ("stage1", "FINISHED"), ("stage2", "FINISHED")}, runs

    # What a person sees in the dashboard: named collectors, labellers and Ray Train workers.
    actors = _actors(job_head, ("job_id", "=", _job_id(job_head, job)))
    names = {a.name for a in actors}
    classes = {a.class_name for a in actors}
    assert "collector-coinrun-0" in names, names
    footer_readers = [a for a in actors if "FooterReader" in a.class_name]
    assert len(footer_readers) <= 6, f"{len(footer_readers)} FooterReader actors for a one-shard corpus"
    assert any("IDMLabeller" in c for c in classes), classes
    assert "RayTrainWorker" in classes, classes

    # The counters reached the head's metrics agent, exactly.
    want = {("ray_lapo_frames_collected_total", ("game", "coinrun")): m.num_frames,
            ("ray_lapo_train_samples_total", ("stage", "stage1")): 5 * 16,
            ("ray_lapo_train_samples_total", ("stage", "stage2")): 5 * 16,
            ("ray_lapo_labelled_frames_total", None): m.num_triplets}
    url = f"http://{_node_ip()}:{job_head.metrics_port}/metrics"
    deadline = time.monotonic() + 30
    while True:
        text = _prometheus(url)
        got = {k: _metric_sum(text, k[0], **dict([k[1]] if k[1] else [])) for k in want}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert got == want
    served = _metric_sum(text, "ray_lapo_triplets_served_total")
    assert served is not None and served >= 5 * 16


@pytest.mark.slow
def test_job_stop_ends_a_running_pretrain_cleanly(job_head, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    job = f"lapo-long-{uuid.uuid4().hex[:6]}"
    _submit(job_head, job, "--collect.out", f"file://{base}/job-corpus", "--out", f"{base}/long-run",
            *TINY, "--stages", "stage1", "--stage1.steps", "1000000")
    deadline = time.monotonic() + 300
    # Stopped once Ray Train holds its workers and placement group, the most there is to clean
    # up: when stage 1 reports its first steps (Ray Train's own lines stay off the console).
    while "[stage1] step " not in _job_logs(job_head, job):
        assert _job_status(job_head, job) in ("PENDING", "RUNNING"), _job_logs(job_head, job)[-4000:]
        assert time.monotonic() < deadline, _job_logs(job_head, job)[-4000:]
        time.sleep(1)

    job_id = _job_id(job_head, job)
    running = {a.class_name for a in _actors(job_head, ("job_id", "=", job_id), ("state", "=", "ALIVE"))}
    assert {"TrainController", "RayTrainWorker"} <= running, running
    assert [g for g in _placement_groups(job_head, ("state", "=", "CREATED")) if g.creator_job_id == job_id]

    t0 = time.monotonic()
    r = job_head.cli("job", "stop", job, "--address", job_head.dashboard, timeout=90)
    stop_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert _job_status(job_head, job) == "STOPPED"
    assert stop_s < 30, f"`ray job stop` took {stop_s:.0f}s"

    # Nothing of the job outlives it: no live actor and no placement group holding CPUs (Ray's
    # PlacementGroupCleaner took over 30 s to go on 2 cores busy with other work). Detached actors
    # are the cluster's, not the job's: Ray Train's state store behind the dashboard's Train view
    # and Ray Data's autoscaling coordinator are meant to outlive every job.
    deadline = time.monotonic() + 90
    while True:
        alive = [a.class_name for a in _actors(job_head, ("job_id", "=", job_id), ("state", "=", "ALIVE"))
                 if not a.is_detached]
        groups = [g.placement_group_id for g in _placement_groups(job_head, ("state", "=", "CREATED"))
                  if g.creator_job_id == job_id]
        if not alive and not groups:
            break
        assert time.monotonic() < deadline, f"left running after stop: actors {alive}, placement groups {groups}"
        time.sleep(1)
