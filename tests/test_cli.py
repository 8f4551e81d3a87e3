"""The command line: every flag documented, defaults shown per preset, short errors, and every
job command written in the README, docs/ and the jobs' own docstrings parsing against its job."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

from test_jobs import _job

from lapo_ray.config import PRETRAIN_PRESETS, PretrainConfig
from lapo_ray.config.cli import format_value, parse_config

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
    from lapo_ray.benchmarks import BENCHMARKS
    from lapo_ray.config import CollectConfig
    from lapo_ray.config.experiment import ExperimentConfig
    from lapo_ray.config.label import LabelJobConfig
    from lapo_ray.config.rl import DecodeConfig, EvaluateConfig, FinetuneConfig
    from lapo_ray.config.sweep import SweepConfig

    classes: set[type] = set()
    for top in (CollectConfig, PretrainConfig, FinetuneConfig, DecodeConfig, EvaluateConfig, ExperimentConfig,
                SweepConfig, LabelJobConfig, *(b.config for b in BENCHMARKS.values())):
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


def test_an_invalid_value_prints_one_usage_line_and_the_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        _job("pretrain").parse_args(["--stage1.lr", "abc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 2, err
    assert err[0].startswith("usage: ") and err[1].endswith("argument --stage1.lr: invalid float value: 'abc'")
    with pytest.raises(SystemExit):
        _job("pretrain").parse_args(["--stage1.lrr", "1e-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unrecognized arguments: --stage1.lrr" in err[1], err
    with pytest.raises(SystemExit):  # a failed validate() is reported the same way
        _job("sweep").parse_args(["--grid", "stage1.lr"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "expected FIELD=V1,V2" in err[1], err


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
                    "label"}, jobs
    assert len(DOCUMENTED) >= 40


@pytest.mark.parametrize("where,job,argv", DOCUMENTED, ids=[f"{w}:{j}" for w, j, _ in DOCUMENTED])
def test_documented_command_parses(where, job, argv, capsys):
    try:
        _job(job).parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: python jobs/{job}.py {shlex.join(argv)} does not parse: "
                    f"{capsys.readouterr().err.strip().splitlines()[-1:]} (exit {exit_.code})")
