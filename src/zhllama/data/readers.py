"""Stream documents from .txt and .jsonl files, with file and line in every complaint."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.errors import ZhllamaError


@dataclass
class ReadReport:
    """What a reader skipped, so that nothing is dropped silently."""

    skipped: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.skipped.append(f"{where}: {why}")
        if len(self.skipped) <= 5:
            print(f"warning: skipped {where}: {why}", file=sys.stderr)


def input_paths(paths: list[str | Path]) -> list[Path]:
    """The input files as paths, all checked to exist before any is read."""
    if not paths:
        raise ZhllamaError("no input files given")
    resolved = [Path(p) for p in paths]
    for path in resolved:
        if not path.is_file():
            raise ZhllamaError(f"{path}: no such file")
    return resolved


def iter_texts(paths: list[str | Path], report: ReadReport | None = None) -> Iterator[str]:
    """Yield the text of every document: a line of a .txt file, or the `text` field of a .jsonl row."""
    report = report if report is not None else ReadReport()
    for path in input_paths(paths):
        jsonl = path.suffix in (".jsonl", ".json")
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise ZhllamaError(f"{where}: not UTF-8 text") from None
                if not text.strip():
                    continue
                if not jsonl:
                    yield text.rstrip("\r\n")
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    report.skip(where, f"malformed JSON ({exc.msg})")
                    continue
                value = row.get("text") if isinstance(row, dict) else None
                if not isinstance(value, str):
                    report.skip(where, "no string `text` field")
                    continue
                yield value
