"""How a setting is declared, and the command-line flags made from it: one source for every option.

A setting is a dataclass field whose metadata carries its help and, for an enumerated setting, its
allowed values: ``setting(default, "what it does")`` and ``choice("a", "b", "c", help=...)`` (the
first value is the default). :func:`add_flags` makes one ``--flag`` per field from exactly that:
its type, its allowed values and its help. A flag keeps no default of its own: :func:`given`
returns only the flags the user typed, so a flag left out never overrides what a checkpoint or a
config file says. Dtype names (``bf16``, ``fp16``, ``fp32``) are read in one place, :func:`torch_dtype`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import field
from typing import Any

import torch

from . import __version__


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every megamdm command uses it: ``--version``, and errors in one line naming the
    problem (``error: ...``), exit code 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument("--version", action="version", version=f"megamdm {__version__}")

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its help (a list default is copied for each instance)."""
    meta = {"help": help, **metadata}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def choice(default: Any, *others: Any, help: str) -> Any:
    """An enumerated setting: ``default`` or one of ``others``, checked when a config is loaded."""
    return setting(default, help, choices=(default, *others))


def choices(cls: type, name: str) -> tuple:
    """The allowed values of an enumerated field."""
    return next(f.metadata["choices"] for f in dataclasses.fields(cls) if f.name == name)


def show(value: Any) -> str:
    """A value as a config file or command line writes it (``null`` for None, lists comma-separated)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
    return str(value)


def bad_choices(obj: Any) -> Iterator[tuple[str, Any, tuple]]:
    """``(name, value, allowed)`` for every enumerated field of ``obj`` holding a value not allowed."""
    for f in dataclasses.fields(obj):
        allowed = f.metadata.get("choices")
        if allowed and getattr(obj, f.name) not in allowed:
            yield f.name, getattr(obj, f.name), allowed


def flag(name: str) -> str:
    """The command-line flag of a field: ``edit_threshold`` -> ``--edit-threshold``."""
    return "--" + name.replace("_", "-")


def _unwrap(hint: Any) -> tuple[type, type | None]:
    """The value type of a field's annotation (``X | None`` -> ``X``) and, for lists, the item type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
        args = list(typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return list, args[0]
    return hint, None


def _items(item: type):
    def parse(text: str) -> list:
        try:
            return [item(v) for v in text.split(",") if v != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes comma-separated {item.__name__} values, got {text!r}") from None

    return parse


_CLASS_DEFAULT = object()


def field_help(f: dataclasses.Field, default: Any = _CLASS_DEFAULT) -> str:
    """A field's help, its allowed values and its default (the class's unless given; None: none shown),
    as ``--help`` shows it."""
    text = f.metadata.get("help", "")
    allowed = f.metadata.get("choices")
    if allowed:
        text += f" (one of: {' | '.join(show(a) for a in allowed)})"
    if default is _CLASS_DEFAULT:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text += f" [default: {show(default)}]"
    elif default is not None:
        text += f" [default: {show(default)}]"
    return text.replace("%", "%%")  # argparse formats help with %


def add_flags(
    parser,
    cls: type,
    *,
    section: str | None = None,
    names: Iterable[str] | None = None,
    with_defaults: bool = True,
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per field of the dataclass ``cls`` (or per field in ``names``), stored under
    ``section.name`` (or ``name``). The help shows the class default, or ``defaults[name]`` (a
    command's own); ``with_defaults=False``: none (the value that applies comes from elsewhere, e.g.
    a checkpoint)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names if names is not None else fields:
        f = fields[name]
        kind, item = _unwrap(hints[name])
        kw: dict[str, Any] = {
            "dest": f"{section}.{name}" if section else name,
            "default": argparse.SUPPRESS,
            "help": field_help(f, (defaults or {}).get(name, _CLASS_DEFAULT) if with_defaults else None),
        }
        allowed = f.metadata.get("choices")
        if kind is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, **kw)
        elif kind is list:
            parser.add_argument(flag(name), type=_items(item), metavar=f"{item.__name__.upper()}[,...]", **kw)
        elif allowed and None not in allowed:
            parser.add_argument(flag(name), type=kind, choices=allowed, **kw)
        else:
            parser.add_argument(flag(name), type=kind, metavar=kind.__name__.upper(), **kw)


def given(args: argparse.Namespace, cls: type, *, section: str | None = None) -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given on the command line, by field name."""
    out = {}
    for f in dataclasses.fields(cls):
        dest = f"{section}.{f.name}" if section else f.name
        if hasattr(args, dest):
            out[f.name] = getattr(args, dest)
    return out


def as_overrides(values: dict[str, Any], section: str) -> list[str]:
    """``{name: value}`` as dotted config overrides ``section.name=value`` (values in JSON, which
    the config's YAML reader takes as they are: strings stay strings, lists stay lists)."""
    return [f"{section}.{name}={json.dumps(value)}" for name, value in values.items()]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``bf16`` / ``fp16`` / ``fp32`` (or torch's names for them) as a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[key]
