"""Sweeps of pretraining recipes on Ray Tune (``jobs/sweep.py``).

A trial is one pretraining run (stage 1 and the probe) of one configuration and one seed, in a
folder of its own: ``<out>/trials/<configuration>/s<seed>``. The supervised ceiling is trained
once per corpus and settings it reads (``ceiling_key``), before any trial, into
``<out>/ceilings/<hash>`` and every trial of those reuses it, so the trials differ only in what the
sweep varies. Tune schedules the trials by resources, keeps its state in ``<out>/tune`` and, run
again, restores the sweep there: finished trials are not run again, and an interrupted trial
continues from its run's own checkpoints.

The table gives, per configuration, the mean of each probe figure over seeds with its 95% t
interval (``evaluation.stats.mean_interval``): one run per configuration cannot rank recipes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from typing import Any

import ray
import ray.tune
from ray.tune import Callback

from lapo_ray import storage
from lapo_ray.config import STAGE1_ONLY_FIELDS, PretrainConfig, config_from_dict
from lapo_ray.config.cli import parse_config
from lapo_ray.config.sweep import SweepConfig, config_name
from lapo_ray.evaluation.plots import plot_sweep
from lapo_ray.evaluation.stats import mean_interval
from lapo_ray.pipelines.pretrain import run_pretrain, train_reference_ceiling
from lapo_ray.progress import format_duration
from lapo_ray.runtime import READ_CPUS, init_ray

# probe.json figures a trial reports to Tune and the table summarises.
FIGURES = ("gap_closed", "probe_acc", "floor_untrained_idm", "ceiling_supervised_idm", "info_bits_trained",
           "nmi_trained", "majority_rate")


TRIAL_MEMORY = 512 * 2**20  # bytes Tune reserves for a trial's driver


@dataclasses.dataclass(frozen=True)
class Trial:
    values: dict[str, str]  # the swept fields' values, as given on the command line
    seed: int

    @property
    def name(self) -> str:
        return config_name(self.values)


def trial_config(base: PretrainConfig, trial: Trial, out: str) -> PretrainConfig:
    """The trial's pretraining config: ``base`` with the trial's values, parsed as the pretrain
    job parses its flags (so a bad value fails as it would there), and its seed."""
    argv = [a for path, value in trial.values.items() for a in (f"--{path.replace('_', '-')}", value)]
    cfg, _ = parse_config(PretrainConfig, {"sweep": lambda: dataclasses.replace(base)}, argv,
                          default_preset="sweep")
    # A trial runs in a folder of Tune's: relative corpus paths would not resolve there.
    corpus = ",".join(storage.absolute(part) for part in cfg.corpus.split(","))
    cfg = dataclasses.replace(cfg, out=storage.join(out, "trials", trial.name, f"s{trial.seed}"), corpus=corpus,
                              stage1=dataclasses.replace(cfg.stage1, seed=trial.seed),
                              data=dataclasses.replace(cfg.data, shuffle_seed=trial.seed))
    return dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, ceiling_from=ceiling_folder(cfg, out)))


# The fields of the resolved config's data, model and stage-1 sections that the ceiling's training
# (pipelines.pretrain.train_ceiling: SupervisedIDMTask on models.SupervisedIDM, stage 1's
# loop and data) does not read. Everything else in them is in the ceiling's key, so a field added
# later keeps ceilings apart until it is listed here. The seeds are the trial's, which the sweep
# sets: the ceiling is trained once, with the first trial's, and shared by every seed.
NOT_READ_BY_CEILING = {
    "data": {"shuffle_seed"},
    # The supervised IDM has the IDM's encoder and a latent layer of the latent's width, no world
    # model or VQ; the latent policy is stage 2's.
    "model": {"wm", "vq", "policy"},
    # The recipe options (Stage1Task only), and the time budget, which the ceiling runs without.
    "stage1": {"seed", "time_budget_min", *STAGE1_ONLY_FIELDS},
}


def ceiling_key(cfg: PretrainConfig) -> dict[str, Any]:
    """Every field of ``cfg`` the supervised IDM's training reads: the corpus (the collected one
    when none is given), and the data, model and stage-1 sections less ``NOT_READ_BY_CEILING``."""
    key: dict[str, Any] = {"corpus": cfg.corpus or cfg.collect.out}
    for section, skip in NOT_READ_BY_CEILING.items():
        key[section] = {k: v for k, v in dataclasses.asdict(getattr(cfg, section)).items() if k not in skip}
    key["model"]["latent_dim"] = cfg.model.latent_dim
    return key


def ceiling_folder(cfg: PretrainConfig, out: str) -> str:
    """Where the ceiling of ``cfg`` lives, under ``--pretrain.probe.ceiling-from`` if given (sweeps
    that share ceilings) or the sweep's folder: named by a hash of ``ceiling_key``, so trials that
    differ in a seed or a stage-1 recipe option share one, and a ceiling trained under any other
    setting it reads is never reused."""
    digest = hashlib.sha1(json.dumps(ceiling_key(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return storage.join(storage.absolute(cfg.probe.ceiling_from or out), "ceilings", digest)


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep, then write its table, CSVs and plot; returns the summary."""
    out = storage.absolute(cfg.out)
    trials = [Trial(values, seed) for values in cfg.configurations() for seed in range(cfg.seeds)]
    configs = {(t.name, t.seed): trial_config(cfg.pretrain, t, out) for t in trials}  # bad values fail here
    storage.makedirs(out)
    storage.write_json(storage.join(out, "sweep.json"), dataclasses.asdict(cfg))
    init_ray()
    _train_ceilings(list(configs.values()))
    print(f"sweep: {len(trials)} trials ({len(trials) // cfg.seeds} configurations x {cfg.seeds} seeds) "
          f"in {out}", flush=True)
    _tune(cfg, out, trials, configs)
    rows = [trial_row(t, configs[(t.name, t.seed)]) for t in trials]
    summary = summarise(rows, cfg.metric)
    write_results(out, rows, summary, cfg.metric)
    return {"out": out, "trials": len(rows), "configurations": summary}


def _train_ceilings(configs: list[PretrainConfig]) -> None:
    """One supervised IDM per ceiling folder, trained before the trials so no two trials race
    to train the same one."""
    seen: dict[str, PretrainConfig] = {}
    for pretrain in configs:
        seen.setdefault(pretrain.probe.ceiling_from, pretrain)
    for folder, pretrain in seen.items():
        print(f"sweep: ceiling for {pretrain.corpus or 'the default corpus'} in {folder}", flush=True)
        train_reference_ceiling(pretrain)


def _trial_fn(config: dict[str, Any]) -> None:
    """The Tune trainable: one pretraining run, its probe figures reported once at the end.

    The run goes to a task of its own outside the trial's placement group: Tune puts a trial's
    child tasks into its group, where the run's Ray Data reads and scan tasks would find no CPU
    (the group holds only the driver's memory) and wait for ever."""
    run = ray.remote(num_cpus=0, scheduling_strategy="DEFAULT")(_pretrain_figures)
    ray.tune.report(ray.get(run.remote(config["trial"]["pretrain"])))


def _pretrain_figures(pretrain: dict[str, Any]) -> dict[str, float]:
    summary = run_pretrain(config_from_dict(PretrainConfig, pretrain))
    probe = summary.get("probe") or {}
    return {k: _number(probe.get(k)) for k in FIGURES} | {"stage1_steps": summary["stage1"]["steps"]}


def _tune(cfg: SweepConfig, out: str, trials: list[Trial], configs: dict[tuple[str, int], PretrainConfig]) -> None:
    """Run the trials on Tune, or restore the sweep Tune left in ``<out>/tune``."""
    # Tune's newer console prints a configuration box and TensorBoard hints even when silent;
    # the older one honours verbose=0, and TrialProgress prints the sweep's own lines.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Memory, not only CPUs: Tune refuses an all-zero request, and the driver holds the probe's
    # triplets; with no CPU of its own a trial leaves a 2-CPU node its worker and one read task.
    trainable = ray.tune.with_resources(_trial_fn, {"CPU": cfg.trial_cpus, "memory": TRIAL_MEMORY})
    fs, path = storage.resolve(out)
    filesystem = None if storage.is_local(out) else fs
    tune_dir = storage.join(out, "tune")
    if ray.tune.Tuner.can_restore(tune_dir, storage_filesystem=filesystem):
        print(f"sweep: resuming {tune_dir}; finished trials are kept", flush=True)
        tuner = ray.tune.Tuner.restore(tune_dir, trainable=trainable, resume_errored=True,
                                       storage_filesystem=filesystem)
    else:
        space = {"trial": ray.tune.grid_search([
            {"name": t.name, "seed": t.seed, "pretrain": dataclasses.asdict(configs[(t.name, t.seed)])}
            for t in trials])}
        tuner = ray.tune.Tuner(
            trainable, param_space=space,
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=_concurrency(cfg)),
            run_config=ray.tune.RunConfig(name="tune", storage_path=path, storage_filesystem=filesystem,
                                          verbose=0, callbacks=[TrialProgress(cfg.metric, len(trials))]))
    errors = [r.error for r in tuner.fit() if r.error is not None]
    if errors:
        # Tune's error text is the worker's whole traceback; its last line names the cause.
        cause = str(errors[0]).strip().splitlines()[-1]
        raise RuntimeError(f"sweep: {len(errors)} trial(s) failed, the first with: {cause} (the traceback is in "
                           f"{storage.join(out, 'tune')}); run the same command again to retry them")


def _concurrency(cfg: SweepConfig) -> int:
    """Trials at once: each holds its Train workers, and one CPU stays free for Ray Data's reads."""
    if cfg.max_concurrent > 0:
        return cfg.max_concurrent
    stage1 = cfg.pretrain.stage1
    per_trial = stage1.num_workers * stage1.cpus_per_worker + cfg.trial_cpus
    return max(1, int((ray.cluster_resources().get("CPU", 1.0) - READ_CPUS) // per_trial))


class TrialProgress(Callback):
    """One line per finished trial with the sweep's rate and ETA. It lives in Tune's saved state,
    so a restored sweep counts the trials finished before it and times only its own."""

    def __init__(self, metric: str, total: int):
        # Tune creates trials as slots free up, so its own list is not the sweep's size.
        self.metric, self.total = metric, total
        self._start, self._finished_before = time.monotonic(), None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tune pickles its callbacks with the sweep, so a restored sweep unpickles the one it saved:
        # a field that one lacks takes its default, and the trials run on (docs/results/choices.md).
        self.__init__(state.get("metric", "gap_closed"), state.get("total", 0))

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self._start, self._finished_before = time.monotonic(), None

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        done = sum(t.status == "TERMINATED" for t in trials) + 1  # this one is not marked yet
        if self._finished_before is None:
            self._finished_before = done - 1
        elapsed = time.monotonic() - self._start
        rate = (done - self._finished_before) / max(elapsed, 1e-9)
        total = self.total or len(trials)
        eta = format_duration((total - done) / rate) if rate > 0 else "?"
        name = trial.config["trial"]["name"]
        value = (trial.last_result or {}).get(self.metric, float("nan"))
        print(f"sweep: trial {done}/{total} {name} s{trial.config['trial']['seed']}: {self.metric} "
              f"{value:.3f} | {rate * 3600:.1f} trials/h | elapsed {format_duration(elapsed)} | ETA {eta}",
              flush=True)


def _number(v: Any) -> float:
    return float("nan") if v is None else float(v)


def trial_row(trial: Trial, cfg: PretrainConfig) -> dict[str, Any]:
    """One finished trial, read back from its own folder (the source of truth, not Tune's state)."""
    probe_uri = storage.join(cfg.out, "probe.json")
    probe = storage.read_json(probe_uri) if storage.exists(probe_uri) else {}
    return {"configuration": trial.name, "seed": trial.seed, **trial.values, "out": cfg.out,
            **{k: _number(probe.get(k)) for k in FIGURES}}


def summarise(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per configuration: seeds, how many gave a measurable figure, mean and 95% half-width."""
    out = []
    for name in dict.fromkeys(r["configuration"] for r in rows):
        runs = [r for r in rows if r["configuration"] == name]
        entry = {"configuration": name, "seeds": len(runs)}
        for k in FIGURES:
            values = [r[k] for r in runs if not math.isnan(r[k])]
            mean, half = mean_interval(values) if values else (float("nan"), float("nan"))
            entry.update({k: mean, f"{k}_half": half, f"{k}_n": len(values)})
        out.append(entry)
    return sorted(out, key=lambda e: -e[metric] if not math.isnan(e[metric]) else math.inf)


def _cell(mean: float, half: float, n: int, seeds: int) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}")
    return text + ("" if n == seeds else f" ({n} of {seeds})")


def render_table(summary: list[dict[str, Any]], metric: str) -> str:
    cols = [metric] + [k for k in FIGURES if k != metric]
    lines = ["| configuration | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for e in summary:
        lines.append(f"| {e['configuration']} | {e['seeds']} | " + " | ".join(
            _cell(e[k], e[f"{k}_half"], e[f"{k}_n"], e["seeds"]) for k in cols) + " |")
    return "\n".join(lines)


def write_results(out: str, rows: list[dict[str, Any]], summary: list[dict[str, Any]], metric: str) -> None:
    """sweep.md (the table), trials.csv (one row per trial), summary.csv and plots/sweep.png."""
    storage.write_bytes(storage.join(out, "sweep.md"), (
        f"# Sweep: {metric} per configuration\n\nMean over seeds, ± the 95% t interval's half-width; "
        "n/a where no seed gave a measurable figure (a gap within noise).\n\n"
        + render_table(summary, metric) + "\n\n![sweep](plots/sweep.png)\n").encode())
    for name, table in (("trials.csv", rows), ("summary.csv", summary)):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
        writer.writeheader()
        writer.writerows(table)
        storage.write_bytes(storage.join(out, name), buf.getvalue().encode())
    plot_sweep(summary, metric, storage.join(out, "plots", "sweep.png"))
    print(render_table(summary, metric), flush=True)
