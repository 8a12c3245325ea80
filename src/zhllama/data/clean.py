"""`zhllama data clean`: normalise, filter and deduplicate Chinese documents, streaming, on every core.

Pipeline, per document (a .txt line or a .jsonl row):
  normalise  control characters, HTML remnants and runs of blank lines go; the rest stays as written (no NFKC:
             it would turn full-width "，。！？（）" into ASCII and change what the model learns to write)
  filter     the first rule that fails names the reason (`filter_reason`)
  dedup      exact copies by a hash of the normalised text, then near copies by MinHash LSH (dedup.py)
The parent reads lines and owns the dedup state; workers do everything else, in order, a bounded number of
chunks ahead, so memory stays flat however big the input (only the dedup index grows, with the kept documents).
"""

from __future__ import annotations

import hashlib
import html
import json
import multiprocessing
import os
import re
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from zhllama.artifacts import atomic_file, check_output_path, write_json_atomic
from zhllama.config import CleanConfig
from zhllama.data.dedup import (
    NearDuplicateIndex,
    codepoints,
    repeated_line_shares,
    repeated_ngram_share,
    signature,
    top_ngram_share,
)
from zhllama.data.readers import input_paths
from zhllama.errors import ZhllamaError

FILTERS = ("too_short", "symbols", "low_cjk", "dup_lines", "dup_ngrams", "top_ngram")
DROP_REASONS = FILTERS + ("exact_duplicate", "near_duplicate")
MAX_LISTED_MALFORMED = 100


# ---------------------------------------------------------------------------------------------------------
# Normalisation

_BLOCK_TAGS = "br|p|div|li|ul|ol|dl|dt|dd|tr|td|th|table|thead|tbody|h[1-6]|hr|blockquote|pre|section|article"
_INLINE_TAGS = ("a|b|i|u|em|strong|span|font|img|sup|sub|small|big|center|code|label|abbr|cite|wbr|ins|del|"
                "mark|html|head|body|title|meta|link|nav|header|footer|iframe|figure|figcaption|input|form")
_SCRIPT = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# Known tag names only, so `List<String>`, "x < y > z" or a literal "<s>" token survive.
_BLOCK = re.compile(rf"</?(?:{_BLOCK_TAGS})\b[^<>]*>", re.IGNORECASE)
_INLINE = re.compile(rf"</?(?:{_INLINE_TAGS})\b[^<>]*>", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")
# C0/C1 controls except tab and newline, plus invisible junk (zero-width space, byte-order mark).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")


def normalize(text: str) -> str:
    """Strip control characters, HTML tags, comments and entities, and runs of blank lines; keep the rest."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "<" in text:
        text = _SCRIPT.sub("", text)
        text = _COMMENT.sub("", text)
        text = _BLOCK.sub("\n", text)
        text = _INLINE.sub("", text)
    if "&" in text:
        text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
    text = _CONTROL.sub("", text).replace("\xa0", " ")  # &nbsp; and its decoded form were meant as spaces
    lines, blank = [], False
    for line in text.split("\n"):
        line = line.rstrip()
        if not line:
            blank = True
            continue
        if blank and lines:
            lines.append("")  # a run of blank lines, however long, becomes one
        lines.append(line)
        blank = False
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Filters

OTHER, CJK, ALNUM, SYMBOL = 0, 1, 2, 3
_PLANES = 0x40000  # planes 0-3; anything above (private-use planes, tags) is clipped to an unassigned code


@lru_cache(maxsize=1)
def _char_classes() -> np.ndarray:
    """Class of every code point, so a document is classified in one vectorised lookup."""
    table = np.zeros(_PLANES, dtype=np.uint8)
    for cp in range(_PLANES):
        if 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF or cp >= 0x20000 \
                or cp == 0x3007:
            table[cp] = CJK  # Han ideographs; planes 2 and 3 hold only those
            continue
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cat[0] == "S" or cat in ("Co", "Cn") or ch in "#*@_\\":
            table[cp] = SYMBOL  # plus the ASCII marks that decorate spam and unassigned or private codes
        elif ch.isalnum():
            table[cp] = ALNUM
    table[0x3FFFE:] = SYMBOL  # noncharacters; also where code points above plane 3 are clipped to
    return table


def filter_reason(text: str, cfg: CleanConfig) -> str | None:
    """The first filter (in `FILTERS` order) that `text` fails, or None if it passes them all."""
    codes = codepoints(text)
    size = len(codes)
    if size < cfg.min_chars:
        return "too_short"
    counts = np.bincount(_char_classes()[np.minimum(codes, _PLANES - 1)], minlength=4)
    if counts[SYMBOL] / size > cfg.max_symbol_share:
        return "symbols"
    if counts[CJK] / max(counts[CJK] + counts[ALNUM], 1) < cfg.min_cjk_share:
        return "low_cjk"
    lines, line_chars = repeated_line_shares(text)
    if lines > cfg.max_dup_line_share or line_chars > cfg.max_dup_line_char_share:
        return "dup_lines"
    if size < cfg.ngram_min_chars:
        return None
    if cfg.dup_ngram_shares:
        # Every repeated (n+1)-gram contains a repeated n-gram, so coverage only shrinks as n grows: when the
        # smallest n is under the strictest limit, the larger ones need not be computed (the common case).
        smallest = min(n for n, _ in cfg.dup_ngram_shares)
        strictest = min(limit for _, limit in cfg.dup_ngram_shares)
        if repeated_ngram_share(codes, smallest) > strictest and any(
                repeated_ngram_share(codes, n) > limit for n, limit in cfg.dup_ngram_shares):
            return "dup_ngrams"
    bound = None
    for n, limit in sorted(cfg.top_ngram_shares):
        # The top n-gram's count can only fall as n grows, so a share measured at a smaller n bounds this one.
        if bound is not None and bound * n <= limit:
            continue
        share = top_ngram_share(codes, n)
        if share > limit:
            return "top_ngram"
        bound = share / n
    return None


# ---------------------------------------------------------------------------------------------------------
# Workers: one chunk of raw lines in, one result per line out

def _process_line(raw: bytes, jsonl: bool, cfg: CleanConfig) -> tuple:
    """("malformed", why) or ("doc", raw_chars, written_chars, reason, output_line, digest, signature_bytes)."""
    try:
        line = raw.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        return ("malformed", f"not UTF-8 text (byte {exc.start})")
    if jsonl:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return ("malformed", f"malformed JSON ({exc.msg})")
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            return ("malformed", "no string `text` field")
        raw_text = row["text"]
    else:
        raw_text = line
        row = {}
    text = normalize(raw_text)
    reason = filter_reason(text, cfg)
    if reason is not None:
        return ("doc", len(raw_text), 0, reason, None, None, None)
    # Other fields (id, label, ...) ride along; the key order of the input row is kept.
    out = json.dumps({**row, "text": text}, ensure_ascii=False) + "\n"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest() if cfg.dedup else None
    sig = signature(text, cfg.num_perm, cfg.shingle).tobytes() if cfg.near_dedup else None
    return ("doc", len(raw_text), len(text), None, out, digest, sig)


def _process_chunk(chunk: list[tuple[str, bytes, bool]], cfg: CleanConfig) -> list[tuple[str, tuple]]:
    return [(where, _process_line(raw, jsonl, cfg)) for where, raw, jsonl in chunk]


def _chunks(paths: list[Path], chunk_lines: int) -> Iterator[list[tuple[str, bytes, bool]]]:
    """Non-blank raw lines with their "file:line", in input order, in chunks."""
    chunk: list[tuple[str, bytes, bool]] = []
    for path in paths:
        jsonl = path.suffix in (".jsonl", ".json")
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if raw.strip():
                    chunk.append((f"{path}:{lineno}", raw, jsonl))
                    if len(chunk) >= chunk_lines:
                        yield chunk
                        chunk = []
    if chunk:
        yield chunk


def _ordered_map(fn, chunks: Iterator, workers: int) -> Iterator:
    """fn over chunks, results in input order, at most 4 chunks per worker in flight.

    Pool.imap would read the whole input into its task queue as fast as it can; this keeps memory bounded.
    """
    if workers <= 1:
        yield from map(fn, chunks)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(fn, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------------------
# The command

def _check(cfg: CleanConfig) -> None:
    shares = [cfg.min_cjk_share, cfg.max_symbol_share, cfg.max_dup_line_share, cfg.max_dup_line_char_share,
              cfg.near_dup_threshold] + [v for _, v in cfg.top_ngram_shares + cfg.dup_ngram_shares]
    if not all(0 <= v <= 1 for v in shares):
        raise ZhllamaError("shares and the near-duplicate threshold must lie between 0 and 1")
    if cfg.shingle < 1 or cfg.num_perm < 16 or cfg.chunk_lines < 1:
        raise ZhllamaError("the shingle size and chunk_lines must be at least 1, num_perm at least 16")


class _Tally:
    """Documents and characters in, kept and dropped per reason; malformed lines by file:line."""

    def __init__(self):
        self.documents = {"in": 0, "kept": 0, "dropped": dict.fromkeys(DROP_REASONS, 0)}
        self.characters = {"in": 0, "kept": 0, "dropped": dict.fromkeys(DROP_REASONS, 0), "written": 0}
        self.malformed: dict = {"count": 0, "lines": []}

    def bad_line(self, where: str, why: str) -> None:
        self.malformed["count"] += 1
        if len(self.malformed["lines"]) < MAX_LISTED_MALFORMED:
            self.malformed["lines"].append(f"{where}: {why}")
        if self.malformed["count"] <= 5:
            print(f"warning: skipped {where}: {why}", file=sys.stderr)

    def document(self, size: int, reason: str | None, written: int) -> None:
        self.documents["in"] += 1
        self.characters["in"] += size
        if reason is None:
            self.documents["kept"] += 1
            self.characters["kept"] += size
            self.characters["written"] += written
        else:
            self.documents["dropped"][reason] += 1
            self.characters["dropped"][reason] += size


def _dropped(docs: dict) -> str:
    """Documents dropped, by reason: "too_short 3, exact_duplicate 1"."""
    return ", ".join(f"{reason} {n:,}" for reason, n in docs["dropped"].items() if n)


def _check_usable(tally: _Tally, paths: list[Path]) -> None:
    """No document left is an error, not an empty output: the input was empty, binary, or all of it was dropped."""
    docs, skipped = tally.documents, tally.malformed["count"]
    names = ", ".join(map(str, paths))
    malformed = f"{skipped} malformed lines skipped" if skipped else ""
    if docs["in"] == 0:
        raise ZhllamaError(f"no documents in {names}" + (f" ({malformed})" if malformed else ""))
    if docs["kept"] == 0:
        raise ZhllamaError(f"no usable document in {names} ({docs['in']:,} read, all dropped: {_dropped(docs)}"
                           + (f"; {malformed}" if malformed else "") + ")")


def summary_line(report: dict) -> str:
    """What `zhllama data clean` prints: documents kept and dropped by reason, malformed lines skipped."""
    docs, bad = report["documents"], report["malformed"]["count"]
    line = (f"kept {docs['kept']:,} of {docs['in']:,} documents ({report['characters']['written']:,} characters) "
            f"in {report['output']}; dropped: {_dropped(docs) or 'none'}")
    return line + (f"; skipped {bad:,} malformed line{'s' if bad != 1 else ''}" if bad else "")


def clean_files(inputs: list[str | Path], out_path: str | Path, report_path: str | Path | None = None,
                cfg: CleanConfig | None = None) -> dict:
    """Clean `inputs` (.jsonl rows with a `text` field, or .txt lines) into `out_path` (JSONL); return the report.

    The report (also written to `report_path` as JSON) counts documents and characters in, kept and dropped
    per reason (characters as read, before normalisation; `written` counts the normalised output), and lists
    malformed lines as "file:line: why". Malformed lines are skipped, never fatal; no document kept is an
    error. The output appears only when the run completes.
    """
    cfg = CleanConfig(**asdict(cfg)) if cfg is not None else CleanConfig()
    cfg.workers = max(1, cfg.workers or os.cpu_count() or 1)
    _check(cfg)
    paths = input_paths(inputs)
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ZhllamaError(f"{out_path} is a folder; the output is one .jsonl file")
    for path in (out_path, report_path):
        if path is not None:
            check_output_path(path)  # before the long part, not after it
    _char_classes()  # built once here, so forked workers inherit it instead of each building it

    tally, seen, near = _Tally(), set(), NearDuplicateIndex(cfg.near_dup_threshold, cfg.num_perm)
    start = time.perf_counter()
    with atomic_file(out_path) as partial_path, partial_path.open("w", encoding="utf-8") as out:
        work = partial(_process_chunk, cfg=cfg)
        for results in _ordered_map(work, _chunks(paths, cfg.chunk_lines), cfg.workers):
            for where, result in results:
                if result[0] == "malformed":
                    tally.bad_line(where, result[1])
                    continue
                _, size, written, reason, line, digest, sig = result
                # Dedup runs here, in input order, so the first copy is kept whatever the worker count.
                if reason is None and digest is not None:
                    if digest in seen:
                        reason = "exact_duplicate"
                    seen.add(digest)
                if reason is None and sig is not None:
                    key = tally.documents["in"]
                    if near.add_if_new(key, np.frombuffer(sig, dtype=np.uint32)) is not None:
                        reason = "near_duplicate"
                tally.document(size, reason, written)
                if reason is None:
                    out.write(line)
        _check_usable(tally, paths)
    seconds = time.perf_counter() - start
    report = {
        "inputs": [str(p) for p in paths],
        "output": str(out_path),
        "config": json.loads(json.dumps(asdict(cfg))),  # tuples as lists, as in the file
        "documents": tally.documents,
        "characters": tally.characters,
        "malformed": tally.malformed,
        "seconds": round(seconds, 3),
        "docs_per_s": round(tally.documents["in"] / seconds, 1),
        "mb_per_s": round(sum(p.stat().st_size for p in paths) / 1e6 / seconds, 3),  # MB of input read
    }
    if report_path is not None:
        write_json_atomic(report_path, report)
    return report
