"""Command-line flags generated from the config dataclasses.

Every leaf field of a (nested) config dataclass becomes a flag named by its path, e.g.
``--stage1.lr 1e-3`` or ``--collect.num-workers 4``, and its ``metadata["help"]`` is the flag's
help line. ``--preset`` picks the starting point and ``--model-preset`` the networks apart from it;
a flag overrides its field only when it is given (its argparse default is ``SUPPRESS``).

``--help`` shows the value every flag has under the chosen preset: a small pre-parser reads
``--preset`` and ``--model-preset`` first, and the full parser is built from that preset's config,
each help line ending in ``(default: ...)`` (``--preset paper --help`` shows the paper's values).
The flags come in one group per top-level section of the config (``stage1``, ``model``, ...)
after a group of its top-level scalar fields; the description keeps its line breaks, so its
example commands stay one per line. A misspelt flag, a value of the wrong type, a flag for a field
the job sets itself (the config's ``check_given``) or a config that fails ``validate`` prints one
line, the error naming the flag, and exits with status 2 (``--help`` has the usage).

``build_parser`` builds without parsing (the jobs' ``parse_args`` and the docs check use it
through ``parse_config``); ``parse_config`` returns ``(config, namespace)``. A job whose first
argument names one of several configs (``jobs/benchmark.py``) parses with ``parse_command``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import shlex
import shutil
import textwrap
import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin

from lapo_ray import UsageError
from lapo_ray.config.models import MODEL_PRESETS, ModelConfig, model_preset


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of ``cls``: resolving evaluates every annotation's text, most of
    the time a parser takes to build."""
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(tp: Any) -> tuple[Callable[[str], Any], dict[str, Any]]:
    """argparse ``type`` and extra kwargs (``choices``, ``nargs``, ``metavar``) for a field type."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        return type(choices[0]), {"choices": choices}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        conv, extra = _converter(inner[0])

        def optional(text: str) -> Any:
            return None if text.lower() in ("none", "null") else conv(text)

        return optional, extra
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        conv, extra = _converter(args[0] if args else str)
        nargs = "+" if origin is list or Ellipsis in get_args(tp) else len(args)
        return conv, {**extra, "nargs": nargs}
    if tp is bool:
        return _parse_bool, {"metavar": "{true,false}"}
    if tp in (int, float, str):
        return tp, {"metavar": tp.__name__.upper()}
    raise TypeError(f"no command-line form for config field type {tp!r}")


def format_value(value: Any) -> str:
    """A field's value as it would be typed after its flag: ``true``, ``16 32 32``, ``''``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return " ".join(format_value(v) for v in value) if value else "empty"
    if isinstance(value, str):
        return shlex.quote(value)
    return str(value)


def _help_line(f: dataclasses.Field, shown: Any) -> str:
    """The field's help, ending in its value in ``shown`` when given (``%`` escaped for argparse)."""
    text = f.metadata.get("help", "")
    if shown is not None:
        text = f"{text} (default: {format_value(getattr(shown, f.name))})".strip()
    return text.replace("%", "%%")


def add_config_args(parser: Any, cls: type, prefix: str = "", shown: Any = None) -> None:
    """Add one flag per leaf field of dataclass ``cls`` to ``parser`` (a parser or an argument
    group). ``shown``, an instance of ``cls``, gives the defaults the help lines name; the flags'
    own defaults stay ``SUPPRESS``, so only the flags given override the preset."""
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            add_config_args(parser, tp, f"{name}.", None if shown is None else getattr(shown, f.name))
            continue
        _add_field(parser, f, tp, name, shown)


def _add_field(parser: Any, f: dataclasses.Field, tp: Any, name: str, shown: Any) -> None:
    """The flag of one leaf field. A field whose metadata says ``repeatable`` (a list the user
    builds up, as ``--grid``) gathers every occurrence; any other flag given twice keeps the last."""
    conv, extra = _converter(tp)
    if f.metadata.get("repeatable"):
        extra["action"] = "extend"
    parser.add_argument(flag_name(name), dest=name, type=conv, default=argparse.SUPPRESS,
                        help=_help_line(f, shown), **extra)


def flag_name(path: str) -> str:
    """The flag of a dotted field path: ``stage1.time_budget_min`` -> ``--stage1.time-budget-min``."""
    return f"--{path.replace('_', '-')}"


def _summary(cls: type) -> str:
    """The first paragraph of a class's docstring, wrapped to the terminal (argparse leaves
    descriptions as written under the raw formatter)."""
    doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
    if not doc or doc.startswith(f"{cls.__name__}("):  # the signature dataclass() writes
        return ""
    return textwrap.fill(" ".join(doc.split()), width=max(40, shutil.get_terminal_size().columns - 6))


def add_grouped_config_args(parser: argparse.ArgumentParser, cls: type, shown: Any = None) -> None:
    """``add_config_args`` in argument groups: the top-level scalar fields of ``cls`` first, then
    one group per top-level dataclass field (``stage1``, ``model``, ...), titled by it."""
    hints = _type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    scalars = [f for f in fields if not _is_dataclass_type(hints[f.name])]
    if scalars:
        group = parser.add_argument_group(f"top level ({cls.__name__})", _summary(cls))
        for f in scalars:
            _add_field(group, f, hints[f.name], f.name, shown)
    for f in fields:
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            group = parser.add_argument_group(f"{f.name} ({tp.__name__})", _summary(tp))
            add_config_args(group, tp, f"{f.name}.", None if shown is None else getattr(shown, f.name))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (one example command a line), help lines wrapped, and the
    default of a flag that has a real one (``--preset``; config flags name theirs in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage is one line (the top options, then ``[--FIELD VALUE ...]``)
    and whose errors are one line naming the flag, as every bad input of a job is: the usage line
    would say nothing the error does not, and ``--help`` lists the flags."""

    def set_short_usage(self) -> None:
        """Fix the usage to the options added so far, on one line, for ``--help`` and errors."""
        formatter = self.formatter_class(prog=self.prog, width=10_000)
        formatter.add_usage(None, self._actions, [])
        line = formatter.format_help().strip().removeprefix("usage: ")
        self.usage = f"{line} [--FIELD VALUE ...]".replace("%", "%%")

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _PreParseError(Exception):
    pass


class _PreParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise _PreParseError(message)


def chosen_presets(argv: list[str] | None, presets: dict[str, Callable[[], Any]],
                   default_preset: str) -> tuple[str, str | None]:
    """``(--preset, --model-preset)`` as ``argv`` gives them, read before the full parser exists
    so that its help can show that preset's values; anything it cannot read falls back to the
    defaults (the full parser then reports it)."""
    pre = _PreParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=default_preset)
    pre.add_argument("--model-preset", default=None)
    try:
        ns, _ = pre.parse_known_args(argv)
    except _PreParseError:
        return default_preset, None
    return (ns.preset if ns.preset in presets else default_preset,
            ns.model_preset if ns.model_preset in MODEL_PRESETS else None)


def preset_config(cls: type, presets: dict[str, Callable[[], Any]], preset: str, model: str | None) -> Any:
    """The config of ``preset``, with the ``model`` preset's networks in every ModelConfig field."""
    config = presets[preset]()
    if model:
        for path in _paths_of_type(cls, ModelConfig):
            config = _replace_path(config, path.split("."), model_preset(model))
    return config


def build_parser(cls: type, presets: dict[str, Callable[[], Any]], argv: list[str] | None = None,
                 description: str = "", default_preset: str = "cpu") -> ConfigArgumentParser:
    """The parser for ``cls``, its help showing the defaults of the preset ``argv`` picks."""
    parser = ConfigArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                        help="named starting point; other flags override its fields")
    if _paths_of_type(cls, ModelConfig):
        # Model size apart from the run budget, as torchtitan's model flavours: e.g. the paper's
        # networks under the cpu preset's short schedule. --model.* flags still override it.
        parser.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), default=None,
                            help="model sizes to use instead of --preset's (paper: the official LAPO networks)")
    parser.set_short_usage()
    add_grouped_config_args(parser, cls, preset_config(cls, presets, *chosen_presets(argv, presets, default_preset)))
    return parser


def parse_config(cls: type, presets: dict[str, Callable[[], Any]], argv: list[str] | None = None,
                 description: str = "", default_preset: str = "cpu") -> tuple[Any, argparse.Namespace]:
    """Build a parser for ``cls``, parse ``argv`` and return ``(config, namespace)``: the preset's
    config with the flags given applied, validated. The namespace also carries ``preset`` and
    ``model_preset``."""
    parser = build_parser(cls, presets, argv, description, default_preset)
    ns = parser.parse_args(argv)
    base = preset_config(cls, presets, ns.preset, getattr(ns, "model_preset", None))
    return _configured(parser, cls, base, ns), ns


def parse_command(commands: dict[str, type], argv: list[str] | None = None,
                  description: str = "") -> tuple[str, Any]:
    """``(name, config)`` for a job whose first argument names a command (``benchmark.py stream
    ...``): the flags after the name are those of its config class in ``commands``, whose defaults
    are the class's own (no presets); the first paragraph of the class's docstring is the
    command's help. Errors and a failed ``validate`` are reported as ``parse_config`` reports
    them."""
    parser = ConfigArgumentParser(description=description, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="NAME")
    parsers = {}
    for name, cls in commands.items():  # the class's summary heads its group of flags
        parsers[name] = sub.add_parser(name, help=_summary(cls), formatter_class=HelpFormatter)
        parsers[name].set_short_usage()
        add_grouped_config_args(parsers[name], cls, cls())
    ns, unknown = parser.parse_known_args(argv)
    if unknown:  # named under the command's usage, not the job's
        parsers[ns.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return ns.command, _configured(parsers[ns.command], commands[ns.command], commands[ns.command](), ns)


def _configured(parser: argparse.ArgumentParser, cls: type, base: Any, ns: argparse.Namespace) -> Any:
    """``base`` with the flags in ``ns`` applied, checked and validated. A config whose job sets
    some of its fields itself refuses flags for them in its ``check_given(paths of the flags
    given)``; that and a failed validate are usage errors."""
    field_paths = set(_leaf_paths(cls))
    given = {k: v for k, v in vars(ns).items() if k in field_paths}
    config = apply_overrides(base, given)
    try:
        if hasattr(config, "check_given"):
            config.check_given(set(given))
        if hasattr(config, "validate"):
            config.validate()
    except UsageError as e:
        parser.error(str(e))
    return config


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``config`` with dotted-path ``overrides`` applied."""
    for path, value in overrides.items():
        config = _replace_path(config, path.split("."), value)
    return config


def get_path(config: Any, path: str) -> Any:
    """The value of the dotted field ``path`` of ``config``."""
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _replace_path(obj: Any, parts: list[str], value: Any) -> Any:
    head, rest = parts[0], parts[1:]
    if not dataclasses.is_dataclass(obj) or not any(f.name == head for f in dataclasses.fields(obj)):
        raise KeyError(f"unknown config field {head!r} in {type(obj).__name__}")
    if rest:
        value = _replace_path(getattr(obj, head), rest, value)
    elif isinstance(value, list) and isinstance(getattr(obj, head), tuple):
        value = tuple(value)
    return dataclasses.replace(obj, **{head: value})


def _paths_of_type(cls: type, target: type, prefix: str = "") -> list[str]:
    """Dotted paths of the fields of ``cls`` (nested) whose type is ``target``."""
    hints = _type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp is target:
            out.append(f"{prefix}{f.name}")
        elif _is_dataclass_type(tp):
            out.extend(_paths_of_type(tp, target, f"{prefix}{f.name}."))
    return out


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    hints = _type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out.extend(_leaf_paths(tp, f"{prefix}{f.name}."))
        else:
            out.append(f"{prefix}{f.name}")
    return out
