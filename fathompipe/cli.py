"""What every command-line entry point shares: quiet pipes, and options generated from the job dataclasses."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any, Callable, Dict, Iterator, Tuple, Type, TypeVar

T = TypeVar("T")


def quiet_pipe(main: Callable[[], int]) -> int:
    """Run `main`; when the reader of stdout goes away (`| head`), end quietly with 141 (128 + SIGPIPE)
    instead of a BrokenPipeError traceback."""
    try:
        rc = main()
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 141


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per field of the dataclass `cls` (nested dataclasses flattened), typed, with the field's default,
    and its `choices` and `help` from the field's metadata; a field without a default is required. So each stage's
    command line is its job's dataclass, never a second copy of the configuration."""
    for f, kind in _leaf_fields(cls):
        flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kw: Dict[str, Any] = {"dest": f.name, "help": _with_default(f, flag, kind, required)}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            kw["choices"] = f.metadata.get("choices")
        if required:
            kw["required"] = True
        else:
            kw["default"] = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(flag, **kw)


def _with_default(f: dataclasses.Field, flag: str, kind: type, required: bool) -> str | None:
    """The field's help with its default, so that `--help` shows what a run uses without the flag (unless the help
    already says it)."""
    text = f.metadata.get("help")
    if required or "default" in (text or ""):
        return text
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = (flag if default else "--no-" + flag[2:]) if kind is bool else "not set" if default is None else default
    return f"{text} (default: {shown})" if text else f"default: {shown}"


def from_args(cls: Type[T], args: argparse.Namespace) -> T:
    """The dataclass `cls` built from options that `add_options(parser, cls)` declared."""
    hints = typing.get_type_hints(cls)
    values: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind = hints[f.name]
        values[f.name] = from_args(kind, args) if dataclasses.is_dataclass(kind) else getattr(args, f.name)
    return cls(**values)


def _leaf_fields(cls: type) -> Iterator[Tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaf_fields(kind)  # type: ignore[arg-type]
            continue
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))  # Optional[X] -> X
        if kind not in (str, int, float, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: a {kind} cannot be a command-line option; mark it NO_CLI")
        yield f, kind
