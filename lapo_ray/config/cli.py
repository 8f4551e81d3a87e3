"""Command-line flags generated from the config dataclasses.

Every field of a (nested) config dataclass becomes a flag named by its path, e.g.
``--stage1.lr 1e-3`` or ``--collect.num-workers 4``; ``--preset`` picks the starting point.
A misspelt flag or a value of the wrong type is an argparse error that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin

from lapo_ray.config.models import MODEL_PRESETS, ModelConfig, model_preset


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
    """argparse ``type`` and extra kwargs for a field type."""
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
        conv, _ = _converter(args[0] if args else str)
        nargs = "+" if origin is list or Ellipsis in get_args(tp) else len(args)
        return conv, {"nargs": nargs}
    if tp is bool:
        return _parse_bool, {"metavar": "{true,false}"}
    if tp in (int, float, str):
        return tp, {}
    raise TypeError(f"no command-line form for config field type {tp!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per leaf field of dataclass ``cls`` (defaults come from the preset later)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            add_config_args(parser, tp, prefix=f"{name}.")
            continue
        conv, extra = _converter(tp)
        help_text = f.metadata.get("help", "")
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=conv, default=argparse.SUPPRESS,
            help=help_text, **extra,
        )


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``config`` with dotted-path ``overrides`` applied."""
    for path, value in overrides.items():
        config = _replace_path(config, path.split("."), value)
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


def parse_config(
    cls: type,
    presets: dict[str, Callable[[], Any]],
    argv: list[str] | None = None,
    description: str = "",
    default_preset: str = "cpu",
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Any, argparse.Namespace]:
    """Build a parser for ``cls``, parse ``argv`` and return ``(config, namespace)``.

    The namespace carries the non-config flags added by ``extra_args``.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                        help="named starting point; other flags override its fields")
    model_paths = _paths_of_type(cls, ModelConfig)
    if model_paths:
        # Model size apart from the run budget, as torchtitan's model flavours: e.g. the paper's
        # networks under the cpu preset's short schedule. --model.* flags still override it.
        parser.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), default=None,
                            help="model sizes to use instead of --preset's (paper: the official LAPO networks)")
    if extra_args:
        extra_args(parser)
    add_config_args(parser, cls)
    ns = parser.parse_args(argv)
    field_paths = set(_leaf_paths(cls))
    overrides = {k: v for k, v in vars(ns).items() if k in field_paths}
    config = presets[ns.preset]()
    if model_paths and ns.model_preset:
        for path in model_paths:
            config = _replace_path(config, path.split("."), model_preset(ns.model_preset))
    config = apply_overrides(config, overrides)
    if hasattr(config, "validate"):
        try:
            config.validate()
        except ValueError as e:
            parser.error(str(e))
    return config, ns


def _paths_of_type(cls: type, target: type, prefix: str = "") -> list[str]:
    """Dotted paths of the fields of ``cls`` (nested) whose type is ``target``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp is target:
            out.append(f"{prefix}{f.name}")
        elif _is_dataclass_type(tp):
            out.extend(_paths_of_type(tp, target, f"{prefix}{f.name}."))
    return out


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out.extend(_leaf_paths(tp, f"{prefix}{f.name}."))
        else:
            out.append(f"{prefix}{f.name}")
    return out
