"""The `zhllama` command: parses flags and calls one library function per command."""

from __future__ import annotations

import sys

import typer

from zhllama.cli import prepare, run, train  # noqa: F401  (they add their commands to the groups)
from zhllama.cli.apps import app
from zhllama.errors import ZhllamaError


# Commands and parameters are read by duck typing: typer has moved between click and a vendored copy of it.
def _command(root, argv: list[str]):
    """The (click) command that argv names: `train pretrain ...` is the pretrain command."""
    command = root
    for arg in argv:
        subcommands = getattr(command, "commands", None)
        if not subcommands or arg not in subcommands:
            break
        command = subcommands[arg]
    return command


def multi_value_options(command) -> set[str]:
    """The options of this command that take several values (declared as lists)."""
    return {name for p in command.params if getattr(p, "multiple", False) for name in p.opts}


def expand_multi_value_options(argv: list[str], root=None) -> list[str]:
    """Rewrite `--input a b` as `--input a --input b` (what click understands), for the options of the command
    in argv that take several values; elsewhere a second value stays an error (`--data a b` of `train pretrain`
    would otherwise silently train on b)."""
    command = _command(root or typer.main.get_command(app), argv)
    multi = multi_value_options(command)
    out, current = [], None
    for arg in argv:
        if arg.startswith("-"):
            current = arg if arg in multi else None
            out.append(arg)
        elif current and out[-1] != current:
            out.extend([current, arg])
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    root = typer.main.get_command(app)
    args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv), root)
    try:
        root(args=args, prog_name="zhllama")
    except ZhllamaError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        # Backstop for a file the library did not word an error for (outputs go through zhllama.artifacts,
        # which does): the path and the reason in one line. An OSError that names no file is a bug: traceback.
        if exc.filename is None:
            raise
        typer.echo(f"error: {exc.filename}: {exc.strerror or exc}", err=True)
        sys.exit(1)
