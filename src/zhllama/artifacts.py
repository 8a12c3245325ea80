"""Output folders: written whole or not at all, each with a zhllama.json that says where it came from."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zhllama import __version__
from zhllama.errors import ZhllamaError

PROVENANCE = "zhllama.json"


@contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `out` only if the block finishes.

    An existing `out` is replaced only when it is empty or was written by zhllama, so a mistyped --out
    cannot wipe a user's folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PROVENANCE).exists())):
        raise ZhllamaError(f"{out} exists and was not written by zhllama; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file under a temporary name, then rename it: a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_provenance(folder: Path, command: str, args: dict, inputs: dict[str, str] | None = None,
                     **extra) -> None:
    record = {
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()},
        "argv": sys.argv,
        "zhllama_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": inputs or {},
        **extra,
    }
    (folder / PROVENANCE).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")


def read_provenance(folder: str | Path) -> dict:
    path = Path(folder) / PROVENANCE
    return json.loads(path.read_text()) if path.exists() else {}
