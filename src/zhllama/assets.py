"""Offline assets that a fresh machine fetches once from PyPI and caches.

The llama-cpp-python source distribution ships llama.cpp's test vocabularies as vocabulary-only GGUF files (the
real Llama-2 SentencePiece vocabulary, Llama-3's byte-level BPE, Qwen2, ...) and the chat templates of well-known
models. `make setup` runs this module so that tests and the demo use the real tokenizers without any model hub.
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
_MODELS = "vendor/llama.cpp/models/"
# name -> member of the sdist; the names are llama.cpp's own (ggml-vocab-NAME.gguf).
VOCABS = ("llama-spm", "llama-bpe", "qwen2", "aquila", "baichuan", "deepseek-llm", "gpt-2")
LLAMA3_TEMPLATE = "templates/meta-llama-Llama-3.1-8B-Instruct.jinja"
QWEN25_TEMPLATE = "templates/Qwen-Qwen2.5-7B-Instruct.jinja"  # the reference of chatml's tool format
# Everything `python -m zhllama.assets` caches: the vocabularies and the templates other stages test against.
ALL_MEMBERS = tuple(f"ggml-vocab-{name}.gguf" for name in VOCABS) + (LLAMA3_TEMPLATE, QWEN25_TEMPLATE)
LLAMA2_VOCAB_MEMBER = _MODELS + "ggml-vocab-llama-spm.gguf"


def cache_dir() -> Path:
    root = os.environ.get("ZHLLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zhllama"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def vocab_gguf(name: str, download: bool = True) -> Path:
    """Path of the cached llama.cpp vocabulary `ggml-vocab-NAME.gguf`, downloading the sdist on first use."""
    if name not in VOCABS:
        raise ZhllamaError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABS)}")
    return sdist_file(f"ggml-vocab-{name}.gguf", download)


def llama2_vocab_gguf(download: bool = True) -> Path:
    """Path of the cached Llama-2 vocabulary GGUF (identical to Meta's tokenizer.model)."""
    return vocab_gguf("llama-spm", download)


def sdist_file(member_suffix: str, download: bool = True) -> Path:
    """Path of the cached file `vendor/llama.cpp/models/MEMBER_SUFFIX` of the sdist."""
    return sdist_files([member_suffix], download)[0]


def sdist_files(member_suffixes: list[str] | tuple[str, ...], download: bool = True) -> list[Path]:
    """Cached paths of several sdist members; the missing ones are extracted in one pass over the tarball
    (76 MB compressed: one pass per file would take seconds each)."""
    root = cache_dir()
    # Cached flat under their base name ("templates/x.jinja" -> x.jinja): the names are unique in the sdist.
    targets = {suffix: root / Path(suffix).name for suffix in member_suffixes}
    missing = {_MODELS + suffix: path for suffix, path in targets.items() if not path.exists()}
    if missing:
        if not download:
            raise ZhllamaError(f"{next(iter(missing.values()))} is not cached; run `make setup`")
        _extract(_download_sdist(root / "downloads"), missing)
    return list(targets.values())


def _extract(sdist: Path, wanted: dict[str, Path]) -> None:
    left = dict(wanted)
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:  # streamed: stops reading the archive once everything is found
                key = next((k for k in left if member.name.endswith("/" + k)), None)
                if key is None or not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                with atomic_file(left.pop(key)) as tmp:
                    tmp.write_bytes(data)
                if not left:
                    break
    except (OSError, tarfile.TarError) as exc:
        raise ZhllamaError(f"cannot read {sdist}: {exc}") from None
    if left:
        raise ZhllamaError(f"{sdist.name} does not contain {', '.join(left)}")


def _download_sdist(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        # Only the project itself as source: ":all:" would also build its build tools (cmake, ninja) from source.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-q", "-d", tmp,
               LLAMA_CPP_SDIST]
        print(f"fetching the llama.cpp vocabularies: {' '.join(cmd[1:])}", file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            raise ZhllamaError(f"could not download {LLAMA_CPP_SDIST} from PyPI")
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        return Path(archive.replace(dest / archive.name))


if __name__ == "__main__":
    for path in sdist_files(ALL_MEMBERS):
        print(path)
