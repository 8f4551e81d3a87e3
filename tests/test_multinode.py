"""Stages across nodes, for real, on one machine: a Ray cluster of a head and two worker nodes
(``ray.cluster_utils.Cluster``), each node its own raylet, object store, CPU budget and labels.

The head has no CPUs: what Ray pins to the driver's node (Ray Train's controller, Ray Data's
split coordinator, both 0-CPU actors) lives there, and every worker and read task runs on the
worker nodes. What this cannot show: traffic between hosts over a real
network (here every node is on one machine and shares its loopback and disk), and GPUs (NCCL).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

from lapo_ray.config import WandbConfig
from lapo_ray.data.corpus import write_corpus
from lapo_ray.data.sources import CorpusSource
from lapo_ray.train.metrics import MetricsSink, read_metrics
from lapo_ray.train.stages import Stage1Task
from test_train import run_stage1, square_episode, tiny_config

TESTS = os.path.dirname(os.path.abspath(__file__))
# Three logical CPUs per worker node: with the one-node run's two workers (1 CPU) and a worker of
# the two-node run (0.5) on one node, a read task (1 CPU) still fits on either node.
WORKER_CPUS = 3


def _node_args(**kw):
    # Port 0 everywhere: another Ray instance on this machine (a user's head, a running job)
    # holds the default dashboard-agent port 52365, and a node whose agent cannot bind it dies
    # at start-up.
    return {"dashboard_agent_listen_port": 0, "include_dashboard": False, "dashboard_port": 0, **kw}


def start_cluster(head_cpus: int = 0, head_store: int = 80 * 2**20, env: dict[str, str] | None = None):
    """A private Ray cluster: its own temp folder (so its address file never points another
    process's ``ray.init()`` at it), the jobs' environment plus ``env`` for every process of it,
    and this process connected to it.
    Returns (cluster, restore), ``restore`` to be called after ``cluster.shutdown()``."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext

    from lapo_ray.runtime import job_env

    if ray.is_initialized():
        ray.shutdown()
    saved = dict(os.environ)
    tmp = tempfile.mkdtemp(prefix="lr-", dir="/tmp")  # short: Unix socket paths live below it
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.update(env or {})
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if TESTS not in paths:
        # Ray workers import this module for the task classes passed to them.
        os.environ["PYTHONPATH"] = os.pathsep.join([TESTS, *filter(None, paths)])
    for key, value in job_env().items():
        os.environ.setdefault(key, value)

    def restore():
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        cluster = Cluster(initialize_head=True, head_node_args=_node_args(
            num_cpus=head_cpus, object_store_memory=head_store, no_monitor=True))
    except Exception:
        _kill_below(tmp)
        restore()
        raise
    ray.init(address=cluster.address, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    return cluster, restore


def _kill_below(temp_dir: str) -> None:
    """End the processes of a head that failed to start (Ray leaves its GCS and dashboard
    running then): exactly those that name its temp folder."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and temp_dir in " ".join(p.info["cmdline"] or ()):
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def add_worker_node(cluster, name: str):
    return cluster.add_node(**_node_args(num_cpus=WORKER_CPUS, object_store_memory=100 * 2**20,
                                         labels={"lapo-node": name}))


@pytest.fixture(scope="module")
def cluster():
    import ray

    # Ray Data packs Parquet files into read tasks of up to 128 MiB of data; this corpus would be
    # a single read task. A small bin gives one task per file, as a large corpus has, so the
    # reads can spread over both nodes.
    c, restore = start_cluster(env={"RAY_DATA_PARQUET_BIN_PACKING_BYTES": str(2**20)})
    add_worker_node(c, "a")
    add_worker_node(c, "b")
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()
    restore()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = str(tmp_path_factory.mktemp("corpus"))
    # 12 files of 2 episodes: 12 read tasks (see the cluster's bin size) to spread over the nodes.
    write_corpus(root, [square_episode(i, 60, rng) for i in range(24)], "coinrun", shard_frames=120)
    return root


class NodeRecordingStage1(Stage1Task):
    """Stage 1 that records, per step and rank, the worker's process, node and triplets, and at
    each report (rank 0) the model and the Ray Data stats of its training shard (which say on
    how many nodes each operator's tasks ran)."""

    def __init__(self, model_cfg, record_dir, step_sleep: float = 0.0):
        super().__init__(model_cfg)
        self.record_dir, self.step_sleep = record_dir, step_sleep

    def loss(self, model, batch):
        import ray
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(self.record_dir, f"steps-rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                                "time": time.time(),
                                "keys": list(zip(batch["episode_id"].tolist(), batch["step"].tolist()))}) + "\n")
        if self.step_sleep:
            time.sleep(self.step_sleep)
        return super().loss(model, batch)

    def extra_metrics(self, model):
        import ray.train

        inner = model.module if hasattr(model, "module") else model
        torch.save({k: v.clone() for k, v in inner.state_dict().items()}, os.path.join(self.record_dir, "state.pt"))
        with open(os.path.join(self.record_dir, f"stats-{os.getpid()}.txt"), "w") as f:
            f.write(ray.train.get_dataset_shard("train").stats())
        return super().extra_metrics(model)


def _steps(record, rank: int) -> list[list[dict]]:
    """The steps of one rank, one list per worker process (attempt), in the order they ran."""
    attempts: dict[int, list[dict]] = {}
    for line in open(os.path.join(record, f"steps-rank{rank}.jsonl")):
        r = json.loads(line)
        attempts.setdefault(r["pid"], []).append(r)
    return list(attempts.values())


def _nodes_used(stats: str, operator: str) -> int:
    """'N nodes used' of one operator in Ray Data's stats text."""
    for section in stats.split("\nOperator ")[1:]:
        name = section.split(":", 1)[0].split(" ", 1)[1]
        # Ray Data names a fused operator after its parts: ReadFilesParquetV2->MapBatches(...).
        if name.split("->")[0] == operator:
            m = re.search(r"Tasks per node: .*?; (\d+) nodes used", section)
            assert m, f"no node count for {operator} in:\n{section}"
            return int(m.group(1))
    raise AssertionError(f"no operator {operator} in:\n{stats}")


STEPS, REPORT, CHECKPOINT = 12, 2, 4


@pytest.fixture(scope="module")
def runs(cluster, corpus, tmp_path_factory):
    """The same seeded 12-step stage-1 run twice, at the same time, its two workers:

    * ``one_node``: on one node (STRICT_PACK);
    * ``two_nodes``: on two nodes (STRICT_SPREAD); after its checkpoint at step 4 and a metrics
      row past it, its node that the one-node run does not use is removed and a fresh node
      joins, on which Ray Train restarts the group from that checkpoint.

    Shard locality is off: the split then hands out blocks in the dataset's order, so both runs
    can be fed the same triplets at every step, whatever the layout. (Run side by side to share
    Ray Train's start-up, about a minute on this machine.)"""
    out = tmp_path_factory.mktemp("runs")
    found, threads = {}, {}
    for layout, strategy in (("one_node", "STRICT_PACK"), ("two_nodes", "STRICT_SPREAD")):
        record = out / f"record-{layout}"
        record.mkdir()
        cfg = tiny_config(str(out / layout), num_workers=2, cpus_per_worker=0.5, steps=STEPS, report_every=REPORT,
                          checkpoint_every=CHECKPOINT, val_batches=0, max_failures=3, placement_strategy=strategy,
                          shard_locality=False, torch_threads=1)
        sink = MetricsSink(cfg.out, "stage1", WandbConfig(mode="disabled"), {})
        task = NodeRecordingStage1(cfg.model, str(record), step_sleep=0.4 if layout == "two_nodes" else 0.0)
        box = {}
        found[layout] = {"record": record, "out": cfg.out, "box": box, "t0": time.monotonic()}
        threads[layout] = threading.Thread(
            target=lambda cfg=cfg, task=task, sink=sink, box=box: box.update(
                result=run_stage1(cfg, corpus, task, sink)))
        threads[layout].start()
    found["two_nodes"].update(_remove_a_node_mid_run(cluster, found, threads["one_node"]))
    for layout, info in found.items():
        threads[layout].join(timeout=600)
        assert not threads[layout].is_alive(), f"{layout}: training did not finish"
        result = info.pop("box")["result"]
        assert result.error is None, f"{layout}: {result.error}"
        info.update(result=result, rows=read_metrics(info["out"], "stage1"),
                    state=torch.load(info["record"] / "state.pt"), ranks=[_steps(info["record"], r) for r in (0, 1)])
        print(f"{layout}: {time.monotonic() - info['t0']:.1f}s")
    return found


def _remove_a_node_mid_run(cluster, found: dict, one_node_thread) -> dict:
    out, record = found["two_nodes"]["out"], found["two_nodes"]["record"]
    snapshot = os.path.join(out, "stage1", "checkpoint_manager_snapshot.json")

    def registered_step() -> int:
        """The newest checkpoint Ray Train has registered (a folder on disk may not be yet)."""
        try:
            return max((r["metrics"]["step"] for r in json.load(open(snapshot))["checkpoint_results"]), default=0)
        except (OSError, ValueError, KeyError):
            return 0

    one_node_file = found["one_node"]["record"] / "steps-rank0.jsonl"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        logged = [r["step"] for r in read_metrics(out, "stage1")]
        one_node_known = one_node_file.exists() or not one_node_thread.is_alive()
        if one_node_known and registered_step() >= CHECKPOINT and max(logged, default=0) > registered_step():
            break
        time.sleep(0.05)
    checkpoint, rows = registered_step(), read_metrics(out, "stage1")
    logged = [r["step"] for r in rows]
    assert CHECKPOINT <= checkpoint < STEPS and max(logged) > checkpoint, (checkpoint, logged)
    spared = _steps(found["one_node"]["record"], 0)[0][0]["node"] if one_node_file.exists() else None
    used = {_steps(record, r)[0][0]["node"] for r in (0, 1)}
    victim_id = next(n for n in sorted(used) if n != spared)
    victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
    removed_at = time.time()
    cluster.remove_node(victim, allow_graceful=False)
    new_node = add_worker_node(cluster, "c").node_id
    return {"checkpoint_seen": checkpoint, "rows_before": rows, "removed_at": removed_at,
            "removed_node": victim_id, "new_node": new_node}


@pytest.mark.slow
def test_two_nodes_train_exactly_what_one_node_trains(cluster, runs):
    """Up to the node's removal the two-node run must match the one-node run step for step: the
    same triplets, and losses equal to 1e-6 (they came out bit for bit equal)."""
    head = cluster.head_node.node_id
    one, two = runs["one_node"], runs["two_nodes"]
    one_nodes = {a[0]["node"] for rank in one["ranks"] for a in rank}
    two_nodes = {rank[0][0]["node"] for rank in two["ranks"]}  # each rank's first process
    assert len(one_nodes) == 1 and head not in one_nodes, one_nodes
    assert len(two_nodes) == 2 and head not in two_nodes, two_nodes
    # Ray Data's reads ran on the worker nodes (the head has no CPU for a read task). Whether the
    # run's 12 reads used one worker node or both varies: Ray Data's SPREAD is best effort, and
    # the one-node run competes for the same CPUs (in 2 of 4 suite runs they all went to one
    # node). test_reads_of_the_training_pipeline_spread_over_the_worker_nodes checks the spread.
    first_pid = two["ranks"][0][0][0]["pid"]
    assert _nodes_used((two["record"] / f"stats-{first_pid}.txt").read_text(), "ReadFilesParquetV2") in (1, 2)

    before = two["rows_before"]  # as metrics.jsonl held them when the node went
    assert [r["step"] for r in before] == list(range(REPORT, before[-1]["step"] + 1, REPORT))
    for r in before:
        ref = next(x for x in one["rows"] if x["step"] == r["step"])
        for key in ("train/loss", "train/wm_loss", "train/vq_loss"):
            assert r[key] == pytest.approx(ref[key], rel=1e-6, abs=0), f"step {r['step']} {key}: two nodes vs one"
    for rank in (0, 1):
        ran = two["ranks"][rank][0]
        assert [s["keys"] for s in ran] == [s["keys"] for s in one["ranks"][rank][0][:len(ran)]], \
            f"rank {rank}: the two layouts were fed different triplets"


def _read_on_node(batch):
    import ray

    return {"node": np.array([ray.get_runtime_context().get_node_id()] * len(batch["episode_id"]))}


@pytest.mark.slow
def test_reads_of_the_training_pipeline_spread_over_the_worker_nodes(cluster, corpus, runs):
    """The stage loop's dataset (``triplet_dataset``: the Parquet reads with the split filter
    fused in), on the two worker nodes once the runs are over: its 12 read tasks run on both
    nodes, never on the CPU-less head."""
    from lapo_ray.config import PipelineConfig
    from lapo_ray.data.triplets import triplet_dataset

    ds = triplet_dataset(CorpusSource(corpus), "all", PipelineConfig(global_shuffle="none"))
    nodes = ds.map_batches(_read_on_node, batch_size=None, batch_format="numpy").take_all()
    per_node = {}
    for row in nodes:
        per_node[row["node"]] = per_node.get(row["node"], 0) + 1
    workers = {n.node_id for n in cluster.worker_nodes}
    assert set(per_node) <= workers and cluster.head_node.node_id not in per_node, per_node
    assert len(per_node) == 2, f"every read on one node: {per_node}"
    assert sum(per_node.values()) == 24  # one row per segment: 24 episodes of 60 frames


@pytest.mark.slow
def test_a_removed_node_is_replaced_and_training_resumes_exactly(cluster, runs):
    """After the removal Ray Train restarts the group on the surviving and the new node from the
    last checkpoint; the rows past it are rewound and written again, the batches of that epoch
    already trained are skipped, and the run ends where the undisturbed run ended: every step's
    loss and the final model (codebook included) equal to 1e-6."""
    one, two = runs["one_node"], runs["two_nodes"]
    resumed = two["result"].metrics["resumed_from_step"]
    assert two["result"].metrics["step"] == STEPS
    assert resumed >= two["checkpoint_seen"], f"resumed from step {resumed}, but step {two['checkpoint_seen']} " \
                                              "was checkpointed"
    assert two["rows_before"][-1]["step"] > resumed, "no metrics row past the checkpoint to rewind"
    survivor = next(rank[0][0]["node"] for rank in two["ranks"] if rank[0][0]["node"] != two["removed_node"])
    for rank in (0, 1):
        attempts = two["ranks"][rank]
        assert len(attempts) == 2, f"rank {rank}: {len(attempts)} worker processes, expected one restart"
        # Each step trained once in the final run: the first attempt's steps up to the
        # checkpoint, then the second attempt's, together the one-node run's triplets.
        final = attempts[0][:resumed] + attempts[1]
        assert [s["keys"] for s in final] == [s["keys"] for s in one["ranks"][rank][0]], \
            f"rank {rank}: after the restart the triplets differ from the undisturbed run's"
    assert {a[0]["node"] for a in (two["ranks"][0][1], two["ranks"][1][1])} == {survivor, two["new_node"]}

    steps = [r["step"] for r in two["rows"]]
    assert steps == list(range(REPORT, STEPS + 1, REPORT)), f"metrics.jsonl is not every report step once: {steps}"
    for r in two["rows"]:
        if r["step"] > resumed:  # rewound and written again by the restarted group
            assert r["resumed_from_step"] == resumed and r["time"] > two["removed_at"], r
        else:
            assert r["resumed_from_step"] == -1 and r["time"] < two["removed_at"], r
        ref = next(x for x in one["rows"] if x["step"] == r["step"])
        assert r["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-6, abs=0), f"step {r['step']}"
    assert one["rows"][0]["train/loss"] != one["rows"][-1]["train/loss"]  # it trained
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=0, atol=1e-6,
                                   msg=f"{key}: the run that lost a node vs the undisturbed run")
    diff = max(float((two["state"][k].float() - v.float()).abs().max()) for k, v in one["state"].items())
    restart = min(a[0]["time"] for a in (two["ranks"][0][1], two["ranks"][1][1])) - two["removed_at"]
    print(f"node removed with checkpoint {two['checkpoint_seen']} registered and rows up to "
          f"{two['rows_before'][-1]['step']}; resumed from {resumed}; first step after the restart {restart:.1f}s after "
          f"the removal; largest difference of any parameter or buffer from the undisturbed run: {diff:g}")
