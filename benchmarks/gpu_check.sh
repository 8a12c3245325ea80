#!/usr/bin/env bash
# The GPU check in one command, from the repo root: bash benchmarks/gpu_check.sh [gpu_check.py flags]
#
# zhllama comes from src/ through PYTHONPATH, not pip: the GPU machine has no network, and an editable install
# would need setuptools' build environment from PyPI. The accelerate subprocesses inherit PYTHONPATH.
# PYTHON picks the interpreter (default: python3 on PATH).
# ZHLLAMA_WHEELS=DIR installs what is missing among the packages some sections need (typer for the CLI, tensorboard
# and matplotlib for the training runs' logs, bitsandbytes) from wheels carried in DIR, offline; without them those
# sections record why they skipped. No tokenizer cache there: carry an HF tokenizer folder and pass --tokenizer DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${ZHLLAMA_WHEELS:-}" ]; then
  for pkg in typer tensorboard matplotlib bitsandbytes; do
    "$PY" -c "import $pkg" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links "$ZHLLAMA_WHEELS" "$pkg" \
      || echo "gpu_check: $pkg not installable from $ZHLLAMA_WHEELS; its sections will say they skipped" >&2
  done
fi
exec "$PY" benchmarks/gpu_check.py "$@"
