"""What the paper-scale command (``benchmarks.paper``) writes: ``paper_stage1.json`` and
``paper_stage1.md``, with every figure named whether or not this run could fill it in (a CPU run
has no MFU, a run without a checkout no official step), so the smoke run on CPU shows what a GPU
run will measure."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import subprocess
from typing import Any

import numpy as np
import torch

from lapo_ray.benchmarks.paper_probe import ROW_FIGURES

JSON_FILE, MARKDOWN_FILE = "paper_stage1.json", "paper_stage1.md"

# Every figure of a run: its place in the JSON (section.key) and what it says. A GPU run fills
# them all; a smoke run on CPU leaves some null and the markdown says "n/a".
FIGURES: dict[str, str] = {
    "device.name": "the device trained on",
    "device.memory_gib": "its memory",
    "device.cpus": "CPU cores of the machine",
    "software.python": "Python", "software.torch": "PyTorch", "software.cuda": "CUDA (PyTorch's build)",
    "software.cudnn": "cuDNN", "software.numpy": "numpy", "software.pyarrow": "pyarrow",
    "software.procgen": "Procgen", "software.lapo_ray_commit": "lapo_ray commit",
    "collection.source": "collected now, reused or given",
    "collection.policy": "behaviour policy", "collection.frames": "frames", "collection.frames_per_s": "frames/s",
    "collection.seconds": "seconds", "collection.mean_episode_return": "mean episode return",
    "corpus.train_triplets": "training triplets an epoch", "corpus.resident_gib": "held on the device",
    "corpus.load_seconds": "seconds to load it there", "corpus.probe_triplets": "labelled validation triplets probed",
    "stage1.preset": "model and stage-1 preset", "stage1.batch_size": "batch size",
    "stage1.precision": "precision", "stage1.compile_used": "torch.compile used",
    "stage1.compile_error": "torch.compile's error, if it fell back to eager",
    "stage1.warmup_seconds": "warm-up (compilation) seconds",
    "stage1.samples_per_s": "samples/s, stage 1 timed alone", "stage1.step_ms": "ms a step",
    "stage1.gflop_per_sample": "GFLOP a sample (FlopCounterMode)", "stage1.tflop_per_s": "TFLOP/s achieved",
    "stage1.mfu": "model FLOPs utilisation against the bf16 peak",
    "stage1.timing_peak_memory_gib": "peak device memory, stage 1 alone",
    "stage1.steps_planned": "steps planned (the lr schedule)", "stage1.steps_done": "steps trained",
    "stage1.samples_done": "samples trained", "stage1.paper_budget_share": "share of the paper's 50,000 x 128",
    "stage1.stop_reason": "why it stopped", "stage1.train_seconds": "seconds of training",
    "stage1.training_samples_per_s": "stage-1 samples/s while training (ceiling and probes included)",
    "ceiling.mode": "how the supervised IDM trained", "ceiling.steps_done": "its steps",
    "ceiling.samples_per_s": "its samples/s timed alone",
    "probe.step": "step of the last probe", "probe.probe_acc": "probe accuracy, trained IDM",
    "probe.floor_untrained_idm": "floor: untrained IDM", "probe.ceiling_supervised_idm": "ceiling: supervised IDM",
    "probe.gap_closed": "share of the floor-to-ceiling gap closed", "probe.info_bits_trained": "bits about the action",
    "probe.nmi_trained": "code-action NMI", "probe.majority_rate": "majority-action rate",
    "official_lapo_step.samples_per_s": "official LAPO step, samples/s (fp32)",
    "official_lapo_step.step_ms": "its ms a step", "official_lapo_step.why": "why it was not timed",
    "peak_memory.device_gib": "peak device memory of the run", "peak_memory.host_gib": "peak host memory (RSS)",
    "wall_seconds": "the command's wall-clock seconds",
}


def versions() -> dict[str, Any]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "numpy": np.__version__}
    for name, dist in (("pyarrow", "pyarrow"), ("procgen", "procgen-mirror"), ("gymnasium", "gymnasium")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["lapo_ray_commit"] = _commit()
    return out


def _commit() -> str | None:
    """This tree's commit, or LAPO_RAY_COMMIT for a copy without .git (the lent machines get one)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        commit = out.stdout.strip()
    except OSError:
        commit = ""
    return commit or os.environ.get("LAPO_RAY_COMMIT") or None


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "cpus": os.cpu_count(), "cpu": _cpu_model()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}")
    else:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info.update(name=f"cpu ({info['cpu']})", memory_gib=memory / 2**30)
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def peak_memory(device: torch.device) -> dict[str, Any]:
    return {"device_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def lookup(result: dict[str, Any], path: str) -> Any:
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _shown(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "/")


def render_markdown(result: dict[str, Any]) -> str:
    lines = ["# Paper-scale stage 1 on one machine", "",
             f"`{result.get('command', '')}`, {result.get('status', '')}", "",
             "| figure | what | value |", "|---|---|---|"]
    lines += [f"| `{path}` | {what} | {_shown(lookup(result, path))} |" for path, what in FIGURES.items()]
    lines += ["", "## Probe at regular steps", ""]
    lines += ["| " + " | ".join(ROW_FIGURES) + " |", "|" + "---|" * len(ROW_FIGURES)]
    rows = result.get("probes") or []
    lines += ["| " + " | ".join(_shown(r.get(k)) for k in ROW_FIGURES) + " |" for r in rows]
    if not rows:
        lines.append("| " + " | ".join("n/a" for _ in ROW_FIGURES) + " |")
    notes = [n for n in result.get("notes", []) if n]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def with_every_figure(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with each of ``FIGURES`` it lacks set to null, so the JSON too names them all."""
    for path in FIGURES:
        node = result
        *sections, key = path.split(".")
        for part in sections:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node.setdefault(key, None)
    return result


def write_outputs(out: str, result: dict[str, Any]) -> None:
    """Both files, each in place only once whole (the run rewrites them as it goes, so one cut off
    by its machine's limit still leaves what it had measured), every figure named."""
    with_every_figure(result)
    os.makedirs(out, exist_ok=True)
    texts = {JSON_FILE: json.dumps(result, indent=2, default=_plain), MARKDOWN_FILE: render_markdown(result)}
    for name, text in texts.items():
        tmp = os.path.join(out, f".{name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
