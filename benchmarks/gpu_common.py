"""What the sections of the GPU check share (benchmarks/gpu_check.py, benchmarks/gpu_training.py): the sizes, the
environment of child processes, and how a section says it cannot run."""
from __future__ import annotations

import gc
import importlib.util
import os

from common import REPO

SEQ, WARMUP, STEPS = 2048, 3, 10
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}


class Skip(Exception):
    """A section that cannot run on this machine; the reason is recorded instead of figures."""


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"needs {', '.join(missing)} (not installed here; see ZHLLAMA_WHEELS in gpu_check.sh)")


def by_name(table: dict, name: str):
    return next((v for k, v in table.items() if k in name), None)


def free_gpu() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30
