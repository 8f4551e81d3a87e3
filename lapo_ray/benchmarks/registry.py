"""Every benchmark by name, and the one call that runs any of them (``jobs/benchmark.py``)."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from lapo_ray.config import BenchConfig, RayBenchConfig
from lapo_ray.config import benchmark as configs
from lapo_ray.runtime import init_ray


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's config class and the module of ``lapo_ray.benchmarks`` whose ``run(cfg) ->
    dict`` measures and ``report(result) -> str`` writes what the job prints. The module is
    imported only when the benchmark runs: most import Ray Data or pyarrow, which the step
    benchmark's machines lack."""

    config: type[BenchConfig]
    module: str

    def functions(self) -> tuple[Callable[[Any], dict[str, Any]], Callable[[dict[str, Any]], str]]:
        module = importlib.import_module(f"lapo_ray.benchmarks.{self.module}")
        return module.run, module.report


BENCHMARKS: dict[str, Benchmark] = {
    "data": Benchmark(configs.DataBenchConfig, "data"),
    "stage1": Benchmark(configs.Stage1BenchConfig, "stage1"),
    "step": Benchmark(configs.StepBenchConfig, "step"),
    "envrunners": Benchmark(configs.EnvRunnersBenchConfig, "env_runners"),
    "stream": Benchmark(configs.StreamBenchConfig, "stream"),
    "label": Benchmark(configs.LabelBenchConfig, "label"),
    "resident": Benchmark(configs.ResidentBenchConfig, "resident"),
    "paper": Benchmark(configs.PaperBenchConfig, "paper"),
}


def run_benchmark(name: str, cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark ``name`` under ``cfg`` (an instance of its config class), print its
    report and, when ``cfg.json`` names a file, write every figure there; return the figures.
    Ray is joined or started (at ``cfg.num_cpus``, with the object store the config caps) only
    for a benchmark whose config is a ``RayBenchConfig``."""
    bench = BENCHMARKS[name]
    if not isinstance(cfg, bench.config):
        raise TypeError(f"benchmark {name!r} takes a {bench.config.__name__}, got a {type(cfg).__name__}")
    run, report = bench.functions()
    if isinstance(cfg, RayBenchConfig):
        init_ray(cfg.num_cpus, object_store_memory=cfg.object_store_bytes())
    result = run(cfg)
    print(report(result))
    if cfg.json:
        write_figures(cfg.json, result)
    return result


def write_figures(path: str, result: dict[str, Any]) -> None:
    """``result`` as JSON at ``path`` (path or URI), in place only once whole."""
    try:  # lazy: storage needs pyarrow, which the step benchmark's machines lack
        from lapo_ray import storage
    except ImportError:  # so a plain local file
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        return
    storage.write_json(path, result)
