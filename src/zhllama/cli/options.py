"""Flags shared by several commands, each declared once, and the options derived from config fields."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated

import typer

from zhllama.config import flag_of
from zhllama.errors import ZhllamaError

Inputs = list[Path]
Model = Annotated[Path, typer.Option("--model", help="HF model folder")]
Out = Annotated[Path, typer.Option("--out")]
Recipe = Annotated[str | None, typer.Option("--config", help="recipe: a YAML file, or a shipped recipe's name "
                                                             "(`zhllama recipes` lists them)")]
Resume = Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")]

# Sampling: each command chooses its own default (greedy for `generate`, warmer for `chat`).
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="most new tokens per reply")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 is greedy")]
TopK = Annotated[int, typer.Option("--top-k", help="0 is off")]
TopP = Annotated[float, typer.Option("--top-p")]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty")]
SamplingSeed = Annotated[int | None, typer.Option("--seed", help="reproducible sampling (runs unbatched)")]


def _cli_type(kind):
    """The type typer parses a field as: Optional stripped, tuples as repeatable lists."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if typing.get_origin(kind) in (list, tuple):
        return list[typing.get_args(kind)[0]]
    return kind


def _help(text: str | None, default) -> str | None:
    if default is None or default is dataclasses.MISSING or isinstance(default, (list, tuple)):
        return text
    shown = str(default).lower() if isinstance(default, bool) else str(default)
    return f"{text or ''} (default: {shown})".strip()


def config_options(cls, only: tuple[str, ...] | None = None):
    """Add one option per flagged field of the config dataclass ``cls`` (or the ``only`` ones) to a command.

    The command receives ``overrides``: {field: value given, or None when not given}, ready for
    ``zhllama.config.load_config``, so that a recipe's value stands unless its flag was given.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if flag_of(f) and (only is None or f.name in only)]

    def decorate(command):
        own_hints = typing.get_type_hints(command, include_extras=True)
        params = [p.replace(annotation=own_hints.get(p.name, p.annotation))
                  for p in inspect.signature(command).parameters.values() if p.name != "overrides"]
        added, shortcut_params = [], {}
        for f in fields:
            flag = flag_of(f)
            option = typer.Option(*flag.names, help=_help(flag.help, f.default))
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                           annotation=Annotated[_cli_type(hints[f.name]) | None, option]))
            for name, value, text in flag.shortcuts:
                pname = "shortcut_" + name.lstrip("-").replace("-", "_")
                shortcut_params[pname] = (f.name, name, value)
                added.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=False,
                                               annotation=Annotated[bool, typer.Option(name, help=text)]))

        @functools.wraps(command)
        def run(*args, **kwargs):
            overrides = {f.name: kwargs.pop(f.name) for f in fields}
            for f in fields:
                for also in flag_of(f).also_sets:
                    overrides[also] = overrides[f.name]
            _apply_shortcuts(overrides, {p: (spec, kwargs.pop(p)) for p, spec in shortcut_params.items()})
            return command(*args, overrides=overrides, **kwargs)

        run.__signature__ = inspect.Signature(params + added)
        run.__annotations__ = {p.name: p.annotation for p in params + added}
        return run

    return decorate


def _apply_shortcuts(overrides: dict, given: dict) -> None:
    chosen = [(field, name, value) for (field, name, value), on in given.values() if on]
    if len(chosen) > 1:
        raise ZhllamaError(f"choose one of {' and '.join(name for _, name, _ in chosen)}")
    for field, name, value in chosen:
        if overrides.get(field) not in (None, value):
            raise ZhllamaError(f"{name} means --{field.replace('_', '-')} {value}, "
                               f"but --{field.replace('_', '-')} {overrides[field]} was given too")
        overrides[field] = value
