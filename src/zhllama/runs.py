"""The layout of a run folder (DESIGN.md, "A run dir"): written by training, read by eval track and resume.

Kept apart from the training code so that a reader of run folders (eval) needs nothing of the trainer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
STATE = "state.json"  # written last into a checkpoint: a folder without it is not a checkpoint
LOG = "log.jsonl"  # one JSON line per logging step
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / LOG
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
