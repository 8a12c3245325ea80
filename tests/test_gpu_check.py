"""benchmarks/gpu_check.sh on a machine without CUDA: one line saying it skipped, exit 0, benchmarks/results untouched
(a CPU run must never overwrite the figures a GPU run wrote)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def snapshot() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()} if RESULTS.is_dir() else {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the real GPU check (minutes)")
def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    before = snapshot()
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--work", str(tmp_path / "work")], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    assert "skipped" in lines[0] and "CUDA" in lines[0]
    assert snapshot() == before
    assert not (tmp_path / "work").exists()  # nothing prepared either: no model built for nothing
