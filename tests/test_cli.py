"""The command line: every flag documented, defaults shown per preset, short errors, and every
job command written in the README, docs/ and the jobs' own docstrings parsing against its job."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import shlex
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from test_jobs import _job

import lapo_ray.config
from lapo_ray.benchmarks import BENCHMARKS
from lapo_ray.config import PRETRAIN_PRESETS, PretrainConfig
from lapo_ray.config.cli import flag_name, format_value, get_path, parse_config

REPO = Path(__file__).resolve().parents[1]


def _help(job: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        _job(job).parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _dataclasses_under(cls: type, seen: set[type]) -> None:
    if cls in seen:
        return
    seen.add(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            _dataclasses_under(hints[f.name], seen)


def test_every_config_field_a_job_takes_has_a_one_line_help():
    from lapo_ray.config import CollectConfig
    from lapo_ray.config.experiment import ExperimentConfig
    from lapo_ray.config.export import ExportConfig
    from lapo_ray.config.label import LabelJobConfig
    from lapo_ray.config.probe import ProbeJobConfig
    from lapo_ray.config.rl import DecodeConfig, EvaluateConfig, FinetuneConfig
    from lapo_ray.config.sweep import SweepConfig

    classes: set[type] = set()
    for top in (CollectConfig, PretrainConfig, FinetuneConfig, DecodeConfig, EvaluateConfig, ExperimentConfig,
                SweepConfig, LabelJobConfig, ExportConfig, ProbeJobConfig, *(b.config for b in BENCHMARKS.values())):
        _dataclasses_under(top, classes)
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if f.init and not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])
               and not f.metadata.get("help", "").strip()]
    multi_line = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                  if "\n" in f.metadata.get("help", "")]
    assert len(classes) >= 20
    assert not missing, f"config fields without metadata help: {sorted(missing)}"
    assert not multi_line, multi_line


def test_help_shows_each_flags_default_under_the_chosen_preset(capsys):
    cpu, paper = PRETRAIN_PRESETS["cpu"](), PRETRAIN_PRESETS["paper"]()
    assert cpu.stage1.steps != paper.stage1.steps and cpu.model.vq.num_embs != paper.model.vq.num_embs

    def shown(text: str, flag: str) -> str:
        block = re.search(rf"\n  {re.escape(flag)} \S+(.*?)(?=\n  --|\n\n|\Z)", text, re.S)
        assert block, f"{flag} not in the help"
        found = re.search(r"\(default: (.*?)\)\s*$", " ".join(block.group(1).split()))
        assert found, block.group(0)
        return found.group(1)

    for preset, cfg in (("cpu", cpu), ("paper", paper)):
        text = _help("pretrain", ["--preset", preset], capsys)
        assert shown(text, "--stage1.steps") == str(cfg.stage1.steps)
        assert shown(text, "--model.vq.num-embs") == str(cfg.model.vq.num_embs)
        assert shown(text, "--stage1.use-gpu") == format_value(cfg.stage1.use_gpu)
    # The networks of --model-preset, the budget of --preset.
    text = _help("pretrain", ["--preset", "cpu", "--model-preset", "paper"], capsys)
    assert shown(text, "--model.vq.num-embs") == str(paper.model.vq.num_embs)
    assert shown(text, "--stage1.steps") == str(cpu.stage1.steps)


def test_help_groups_flags_by_section_and_keeps_the_descriptions_lines(capsys):
    text = _help("pretrain", [], capsys)
    for section in ("collect", "data", "model", "stage1", "stage2", "label", "probe"):
        assert re.search(rf"^{section} \(\w+Config\):$", text, re.M), f"no group for {section}"
    # Flags land in their own section's group: the stage-1 lr under stage1, not under stage2.
    stage1 = text.split("\nstage1 (")[1].split("\nstage2 (")[0]
    assert "--stage1.lr" in stage1 and "--stage2.lr" not in stage1
    # The description's example commands stay one a line, as the job's docstring writes them.
    for line in _job("pretrain").__doc__.splitlines():
        if line.strip().startswith("python jobs/"):
            assert line.rstrip() in text.splitlines()
    assert text.splitlines()[0].startswith("usage: ") and "[--FIELD VALUE ...]" in text.splitlines()[0]


def test_an_invalid_value_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        _job("pretrain").parse_args(["--stage1.lr", "abc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].endswith(": error: argument --stage1.lr: invalid float value: 'abc'"), err
    with pytest.raises(SystemExit):
        _job("pretrain").parse_args(["--stage1.lrr", "1e-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --stage1.lrr" in err[0], err
    with pytest.raises(SystemExit):  # a failed validate() is reported the same way
        _job("sweep").parse_args(["--grid", "stage1.lr"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected FIELD=V1,V2" in err[0], err


def _refusal(job: str, argv: list[str], capsys) -> str:
    """The one line of a job that refuses ``argv`` with exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        _job(job).parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and ": error: " in err[0], err
    return err[0]


def test_the_stage1_recipe_options_are_flags_of_stage1_only(capsys):
    from lapo_ray.config import STAGE1_ONLY_FIELDS, config_from_dict

    cfg, _ = _job("pretrain").parse_args(["--stage1.augment", "shift", "--stage1.action-labels", "8"])
    assert cfg.stage1.augment == "shift" and cfg.stage1.action_labels == 8
    assert STAGE1_ONLY_FIELDS == {"action_labels", "action_label_weight", "action_label_batch", "change_weight",
                                  "change_baseline", "augment", "shift_pad"}
    assert _refusal("pretrain", ["--stage2.augment", "shift"], capsys).endswith(
        "unrecognized arguments: --stage2.augment shift")
    # A run's config.json from before they were stage 1's own still reads: stage 2's copies did nothing.
    old = PRETRAIN_PRESETS["cpu"]().to_dict()
    old["stage2"].update(augment="none", shift_pad=4)
    assert config_from_dict(PretrainConfig, old) == PRETRAIN_PRESETS["cpu"]()


def test_a_sweep_refuses_what_each_trial_sets(capsys):
    base = ["--pretrain.corpus", "c"]
    assert _refusal("sweep", [*base, "--pretrain.stage1.seed", "3"], capsys).endswith(
        "--pretrain.stage1.seed is set by the sweep for each trial (--seeds)")
    assert _refusal("sweep", [*base, "--grid", "data.shuffle_seed=1,2"], capsys).endswith(
        "--grid data.shuffle_seed: each trial's data.shuffle_seed is set by the sweep (--seeds)")


def test_flags_override_only_what_they_name_and_a_repeatable_flag_gathers():
    cfg, _ = parse_config(PretrainConfig, PRETRAIN_PRESETS, ["--preset", "paper", "--stage1.lr", "5e-4"])
    paper = PRETRAIN_PRESETS["paper"]()
    assert cfg.stage1.lr == 5e-4 and dataclasses.replace(cfg.stage1, lr=paper.stage1.lr) == paper.stage1
    assert cfg.model == paper.model and cfg.data == paper.data
    sweep, _ = _job("sweep").parse_args(["--pretrain.corpus", "data/c", "--grid", "stage1.augment=none,shift",
                                          "--grid", "model.vq.enabled=true,false"])
    assert sweep.grid == ("stage1.augment=none,shift", "model.vq.enabled=true,false")
    assert len(sweep.configurations()) == 4
    cfg, _ = parse_config(PretrainConfig, PRETRAIN_PRESETS, ["--probe.hidden", "8", "--probe.hidden", "16", "4"])
    assert cfg.probe.hidden == (16, 4)  # any other flag given twice: the last wins


def _documented_commands():
    """(where, job, argv) of every ``python jobs/<job>.py ...`` written in the README, docs/*.md,
    cluster/*.md and the jobs' docstrings; a placeholder (``<subcommand>``) is left out."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "cluster").glob("*.md")),
             *sorted((REPO / "jobs").glob("*.py"))]
    for path in files:
        text = path.read_text().replace("\\\n", " ")
        if path.suffix == ".py":
            text = _job(path.stem).__doc__ or ""
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in re.finditer(r"python jobs/(\w+)\.py", line):
                rest = re.split(r"`|\s#|&&|\|\||\||;|\s>", line[m.end():])[0]
                if "<" in rest or "..." in rest:
                    continue
                yield f"{path.relative_to(REPO)}:{lineno}", m.group(1), shlex.split(rest)


DOCUMENTED = list(_documented_commands())


def test_the_docs_document_every_job():
    jobs = {job for _, job, _ in DOCUMENTED}
    assert jobs >= {"collect", "pretrain", "finetune", "decode", "evaluate", "experiment", "benchmark", "sweep",
                    "label", "probe"}, jobs
    assert len(DOCUMENTED) >= 40


@pytest.mark.parametrize("where,job,argv", DOCUMENTED, ids=[f"{w}:{j}" for w, j, _ in DOCUMENTED])
def test_documented_command_parses(where, job, argv, capsys):
    try:
        _job(job).parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: python jobs/{job}.py {shlex.join(argv)} does not parse: "
                    f"{capsys.readouterr().err.strip().splitlines()[-1:]} (exit {exit_.code})")


# Configs with nothing a machine sizes: their `paper` preset is rightly their `cpu` one.
SAME_ON_EVERY_MACHINE = {"lapo_ray.config.export.EXPORT_PRESETS", "lapo_ray.config.probe.PROBE_PRESETS"}


def test_every_config_with_presets_defaults_to_its_cpu_preset():
    presets = {}
    for info in pkgutil.iter_modules(lapo_ray.config.__path__, "lapo_ray.config."):
        module = importlib.import_module(info.name)
        presets.update({f"{info.name}.{k}": v for k, v in vars(module).items() if k.endswith("_PRESETS")})
    presets.update({f"lapo_ray.config.{k}": v for k, v in vars(lapo_ray.config).items() if k.endswith("_PRESETS")})
    assert len(presets) >= 8, sorted(presets)
    for name, named in presets.items():
        cls = type(named["cpu"]())
        assert named["cpu"]() == cls(), f"{name}: {cls.__name__}() is not the cpu preset"
        if name not in SAME_ON_EVERY_MACHINE:
            assert named["paper"]() != cls(), f"{name}: the paper preset is the cpu preset"


# What a job needs besides its defaults to parse at all.
REQUIRED = {"label": ["--checkpoint", "c", "--corpus", "d"], "probe": ["--checkpoint", "c", "--corpus", "d"],
            "export": ["--run", "r", "--out", "o"],
            "sweep": ["--pretrain.corpus", "c"]}
# Other values of fields whose next value by type would be invalid.
OTHER = {"game": "ninja", "stages": "stage1", "variants": "rl", "grid": ("stage1.lr=0.1",)}


def _other(name: str, tp: Any, value: Any) -> Any:
    """A valid value of a field other than ``value``."""
    if name in OTHER:
        return OTHER[name]
    if get_origin(tp) is Literal:
        return next(choice for choice in get_args(tp) if choice != value)
    if isinstance(value, bool):
        return not value
    if value is None:
        return 1
    if isinstance(value, (int, float)):  # halved floats stay in [0, 1); doubled ints stay powers of two
        return (value * 2 or 1) if isinstance(value, int) else (value / 2 or 0.5)
    if isinstance(value, tuple):
        return value[:-1] if len(value) > 1 else (*value, *value)
    return f"{value}x"


def _leaf_fields(cls: type, prefix: str = ""):
    """(dotted path, type) of every leaf field of ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


def _job_configs():
    """(job, argv before the flags, parse: argv -> the config the job runs) of every job in jobs/."""
    for path in sorted((REPO / "jobs").glob("*.py")):
        module = _job(path.stem)
        if path.stem == "benchmark":
            for name in BENCHMARKS:
                yield f"benchmark {name}", [name], lambda argv, m=module: m.parse_args(argv)[1]
        elif path.stem == "experiment":
            yield "experiment", [], lambda argv, m=module: m.parse_args(argv)[0].resolved()
        else:
            yield path.stem, REQUIRED.get(path.stem, []), lambda argv, m=module: m.parse_args(argv)[0]


JOB_CONFIGS = list(_job_configs())


@pytest.mark.parametrize("job,head,parse", JOB_CONFIGS, ids=[job for job, _, _ in JOB_CONFIGS])
def test_every_flag_changes_its_field_or_is_refused_naming_it(job, head, parse, capsys):
    """Each flag set to another valid value: the config the job runs holds that value, or the job
    refuses the flag in one line that names it. A flag accepted and then overwritten fails."""
    default = parse(head)
    flags = list(_leaf_fields(type(default)))
    failed = []
    for path, tp in flags:
        name = path.rsplit(".", 1)[-1]
        value = _other(name, tp, get_path(default, path))
        argv = [*head, flag_name(path), *shlex.split(format_value(value))]
        try:
            got = get_path(parse(argv), path)
        except SystemExit as exit_:
            err = capsys.readouterr().err.strip().splitlines()
            if not (exit_.code == 2 and len(err) == 1 and name in err[0].replace("-", "_")):
                failed.append(f"{shlex.join(argv)}: exit {exit_.code}, {err}")
            continue
        if got != value:
            failed.append(f"{shlex.join(argv)}: accepted, but the config it runs has {path} = {got!r}")
    assert len(flags) >= 3 and not failed, "\n".join(failed)
