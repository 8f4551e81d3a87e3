"""Peak memory of every process of a Ray node, read from /proc (Linux; no psutil needed):
``ProcessMemory`` samples a process tree, ``format_processes`` prints its table, ``role`` names
a process by the titles Ray gave it."""

from __future__ import annotations

import os
import threading
import time

# Process titles that name a role, in the order they are looked for: a Ray worker takes a title
# per task it runs, and the first match names it.
ROLES = ("RayTrainWorker", "ReadFiles", "SplitCoordinator", "TrainController", "DatasetManager",
         "SpillWorker", "RestoreWorker", "MapWorker", "raylet", "gcs_server", "DashboardAgent",
         "dashboard.py", "RuntimeEnvAgent", "log_monitor")


def _proc_tree(root: int) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _proc_status(pid: int) -> dict[str, int] | None:
    """VmHWM (the kernel's record of the process's peak resident memory), VmRSS, RssAnon and
    RssShmem (object-store pages it touched) in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out if "VmHWM" in out else None


def _proc_name(pid: int) -> str:
    """A Ray worker's process title (``ray::RayTrainWorker...``) or the program and its script."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    prog = os.path.basename(argv[0])
    script = next((os.path.basename(a) for a in argv[1:] if a.endswith(".py")), "")
    return f"{prog} {script}".strip()


def _reset_peaks(root: int) -> None:
    """Restart the kernel's high-water mark of every process below ``root`` at its current size,
    so peaks count from here on."""
    for pid in _proc_tree(root):
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


class ProcessMemory:
    """Peak memory of a process and every process below it: the driver and the Ray instance it
    started (GCS, raylets and their agents, every worker), sampled in a thread.

    A process's peak is the kernel's VmHWM, exact while the process lives; a process that ends
    between two samples keeps the peak of its last sample. RSS counts the object-store pages a
    process has touched (RssShmem: shared, so summing RSS over processes counts them again), and
    RssAnon is its private memory."""

    def __init__(self, root: int | None = None, interval_s: float = 0.5):
        self.root, self.interval_s = root or os.getpid(), interval_s
        self.procs: dict[int, dict] = {}
        self._stop = None
        self._thread = None

    def sample(self) -> None:
        for pid in _proc_tree(self.root):
            st = _proc_status(pid)
            if st is None:
                continue
            p = self.procs.setdefault(pid, {"pid": pid, "names": set(), "peak_rss": 0, "peak_anon": 0,
                                            "peak_shmem": 0, "samples": []})
            name = _proc_name(pid)
            if name != "ray::IDLE":
                p["names"].add(name)
            p["peak_rss"] = max(p["peak_rss"], st["VmHWM"])
            p["peak_anon"] = max(p["peak_anon"], st.get("RssAnon", 0))
            p["peak_shmem"] = max(p["peak_shmem"], st.get("RssShmem", 0))
            p["samples"].append((time.time(), st["VmRSS"], st.get("RssAnon", 0)))

    def __enter__(self) -> "ProcessMemory":
        _reset_peaks(self.root)  # this driver included
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=run, name="process-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def table(self) -> list[dict]:
        """One row per process, largest peak first: pid, name(s), peak RSS, private and shared,
        and the samples (time, RSS, private) it was seen with."""
        rows = [{**p, "names": sorted(p["names"]) or ["ray::IDLE"]} for p in self.procs.values()]
        return sorted(rows, key=lambda r: -r["peak_rss"])


def role(names: list[str]) -> str:
    """A short name for a process from the titles it had (a Ray worker takes one per task)."""
    for key in ROLES:
        if any(key in n for n in names):
            return key
    hit = next((n for n in names if n.startswith("ray::")), None)
    return hit.split(".")[0].removeprefix("ray::") if hit else names[0]


def format_processes(procs: list[dict], most: int = 12) -> str:
    """Lines of the processes with the largest peaks, in MiB."""
    lines = [f"{'process':<22} {'pid':>7} {'peak RSS':>9} {'private':>8} {'store pages':>11}"]
    for p in procs[:most]:
        lines.append(f"{role(p['names']):<22} {p['pid']:>7} {p['peak_rss'] / 2**20:>9.0f} "
                     f"{p['peak_anon'] / 2**20:>8.0f} {p['peak_shmem'] / 2**20:>11.0f}")
    if len(procs) > most:
        rest = procs[most:]
        lines.append(f"... {len(rest)} more, each at most {max(p['peak_rss'] for p in rest) / 2**20:.0f} MiB")
    return "\n".join(lines)
