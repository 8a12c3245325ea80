"""Outputs written whole or not at all, folders each with a zhllama.json (PROVENANCE) that says where they came from.

One mechanism for every output: write under a hidden sibling name (`.NAME.partial-PID`), rename into place when
complete. `atomic_file` for one file, `atomic_output_dir` for a folder, `write_text_atomic`/`write_json_atomic` for
small files; `replace_dir` is the last step alone, for writers whose temporary folder is shared by several
processes (training checkpoints).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zhllama import __version__
from zhllama.errors import ZhllamaError

PROVENANCE = "zhllama.json"  # in every output folder: the command, its arguments, hashes of its inputs


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: we are about to write it afresh
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a name we did not make): leave it alone
    return True


def remove_stale_partials(out: Path) -> None:
    """Delete the `.NAME.partial-PID` files and folders that killed runs left beside `out`.

    Only those whose process is gone: a concurrent run writing the same output keeps its own. A killed 7B export
    leaves gigabytes, and no later run would otherwise look at a hidden file.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.partial-(\d{{1,10}})$")
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return  # the folder does not exist yet (or cannot be listed): nothing of ours is there
    for path in siblings:
        match = pattern.match(path.name)
        if match and not _alive(int(match.group(1))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def cannot_write(out: str | Path, exc: OSError) -> ZhllamaError:
    """The one-line error for an output that cannot be written: the path and the reason."""
    out = Path(out)
    reason = exc.strerror or str(exc) or type(exc).__name__
    for parent in out.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():  # mkdir under a file reports "File exists" or "Not a directory"
                reason = f"{parent} is a file, not a folder"
            break
    return ZhllamaError(f"cannot write {out}: {reason}")


def check_output_path(out: str | Path) -> None:
    """Refuse, before any long work, an output whose nearest existing parent is a file or not writable."""
    out = Path(out)
    for parent in out.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ZhllamaError(f"cannot write {out}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ZhllamaError(f"cannot write {out}: {parent} is not writable")
            return


def make_dir(path: str | Path, output: str | Path | None = None) -> Path:
    """mkdir -p `path`, or a one-line error naming `output` (by default the folder itself) and the reason."""
    path = Path(path)
    output = path if output is None else Path(output)
    check_output_path(output)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(output, exc) from None
    return path


# Errors that can only come from writing, even when the OS does not name the file (a write() on an open handle).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _is_write_error(exc: OSError, *paths: Path) -> bool:
    """Whether an OSError raised while producing an output is about that output (not about reading an input)."""
    names = [Path(f) for f in (exc.filename, exc.filename2) if f is not None]
    if not names:
        return exc.errno in _WRITE_ERRNOS
    return any(name == p or p in name.parents for name in names for p in paths)


@contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; rename it to `out` only if the block finishes.

    Stale partial files of killed runs are removed first; an output that cannot be written is a one-line
    ZhllamaError naming it and the reason.
    """
    out = Path(out)
    if out.is_dir():
        raise ZhllamaError(f"{out} is a folder; the output is one file")
    make_dir(out.parent, output=out)
    remove_stale_partials(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if _is_write_error(exc, out, tmp):
            raise cannot_write(out, exc) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `out` only if the block finishes.

    An existing `out` is replaced only when it is empty or was written by zhllama, so a mistyped --out
    cannot wipe a user's folder. Stale partial folders of killed runs are removed first; an output that cannot
    be written is a one-line ZhllamaError naming it and the reason.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PROVENANCE).exists())):
        raise ZhllamaError(f"{out} exists and was not written by zhllama; choose another --out")
    make_dir(out.parent, output=out)
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_error(exc, out, tmp):
            raise cannot_write(out, exc) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`; a previous `out` goes only once the new one is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)  # keep the previous output rather than none
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file under a temporary name, then rename it: a reader never sees half of it."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


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
    """Write `folder`/zhllama.json: the command, its arguments and argv, the zhllama version, the time, input hashes."""
    record = {
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()},
        "argv": sys.argv,
        "zhllama_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": inputs or {},
        **extra,
    }
    write_json_atomic(folder / PROVENANCE, record)


def read_provenance(folder: str | Path) -> dict:
    path = Path(folder) / PROVENANCE
    return json.loads(path.read_text()) if path.exists() else {}
