"""Offline assets that a fresh machine fetches once from PyPI and caches.

The real Llama-2 vocabulary (32,000 pieces with scores and types, identical to Meta's tokenizer.model) ships
inside the llama-cpp-python source distribution as a vocabulary-only GGUF file. `make setup` runs this module
so that tests and the demo can extend the real tokenizer without any model hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from zhllama.artifacts import atomic_file
from zhllama.errors import ZhllamaError

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA2_VOCAB_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"


def cache_dir() -> Path:
    root = os.environ.get("ZHLLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zhllama"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama2_vocab_gguf(download: bool = True) -> Path:
    """Path of the cached Llama-2 vocabulary GGUF, downloading the sdist on first use."""
    target = cache_dir() / "ggml-vocab-llama-spm.gguf"
    if target.exists():
        return target
    if not download:
        raise ZhllamaError(f"the Llama-2 vocabulary is not cached at {target}; run `make setup`")
    sdist = _download_sdist(cache_dir() / "downloads")
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(LLAMA2_VOCAB_MEMBER)), None)
        if member is None:
            raise ZhllamaError(f"{sdist.name} does not contain {LLAMA2_VOCAB_MEMBER}")
        data = tar.extractfile(member).read()
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
    return target


def _download_sdist(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        # Only the project itself as source: ":all:" would also build its build tools (cmake, ninja) from source.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-q", "-d", tmp,
               LLAMA_CPP_SDIST]
        print(f"fetching the Llama-2 vocabulary: {' '.join(cmd[1:])}", file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            raise ZhllamaError(f"could not download {LLAMA_CPP_SDIST} from PyPI")
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        return Path(archive.replace(dest / archive.name))


if __name__ == "__main__":
    print(llama2_vocab_gguf())
