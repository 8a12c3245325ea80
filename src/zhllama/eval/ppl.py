"""Perplexity and bits per character of a model on held-out text, with a sliding window.

This is the Hugging Face "perplexity of fixed-length models" method. A document longer than the window is
read by windows of seq_len tokens that start every `stride` tokens; each window scores only the tokens that no
earlier window scored (the others are labelled -100 and serve as context), so every token is scored once, with
up to seq_len - 1 tokens of context. A smaller stride gives more context per token and costs more forward passes.

One difference from the Hugging Face loop: a window always keeps at least one token of context before its first
target. With stride == seq_len their loop never scores the first token of each window (the label shift drops it);
here such a window starts one token earlier instead, so stride == seq_len reads non-overlapping chunks of
seq_len - 1 targets and still scores every token.

Each document is tokenized on its own, with BOS, and scored on its own: documents are not concatenated, because a
document's first tokens should not be predicted from the end of an unrelated one (no cross-document context).
So the tokens scored are exactly the text's tokens (BOS is context, never a target), and the characters counted
are exactly the text's characters.

Perplexity is per token, so it depends on the tokenizer: a vocabulary-extended model cuts Chinese text into fewer,
harder tokens and its perplexity is not comparable with the base model's. Bits per character (total NLL in nats /
ln 2 / characters) measures the same thing per character of text and is comparable across tokenizers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from zhllama.artifacts import write_json_atomic
from zhllama.data.readers import ReadReport, input_paths, iter_texts
from zhllama.errors import ZhllamaError
from zhllama.scoring import IGNORE, bits_per_char, count_chars, pad_id, right_pad, token_nll

MAX_DEFAULT_SEQ_LEN = 2048


@dataclass
class PplResult:
    """Summed negative log-likelihood (nats) over the scored tokens, and what it was summed over."""

    nll_sum: float
    tokens: int
    chars: int
    docs: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_char(self) -> float:
        return bits_per_char(self.nll_sum, self.chars)

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars if self.chars else float("nan")

    def __add__(self, other: PplResult) -> PplResult:
        return PplResult(self.nll_sum + other.nll_sum, self.tokens + other.tokens, self.chars + other.chars,
                         self.docs + other.docs)

    def to_dict(self) -> dict:
        return {"docs": self.docs, "chars": self.chars, "tokens": self.tokens, "nll_sum": self.nll_sum,
                "ppl": self.ppl, "bits_per_char": self.bits_per_char, "tokens_per_char": self.tokens_per_char}


def check_window(seq_len: int, stride: int) -> None:
    if seq_len < 2:
        raise ZhllamaError(f"--seq-len {seq_len} is too small (at least 2: one token of context, one scored)")
    if not 1 <= stride <= seq_len:
        raise ZhllamaError(f"--stride {stride} must be between 1 and --seq-len ({seq_len})")


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of every window over a document of n_tokens tokens, BOS at position 0.

    The window is tokens [begin, end); its targets are [first_target, end), each predicted from the tokens
    before it inside the window.
    """
    check_window(seq_len, stride)
    spans = []
    begin, scored_up_to = 0, 1  # BOS is context only
    while scored_up_to < n_tokens:
        end = min(begin + seq_len, n_tokens)
        spans.append((begin, end, scored_up_to))
        scored_up_to = end
        begin = min(begin + stride, end - 1)  # keep one token of context before the next target
    return spans


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with BOS in front, added here so that tokenizers that omit it still get one."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ZhllamaError("the tokenizer has neither a BOS nor an EOS token to start documents with")
    from zhllama.chat.control import encode_plain  # "</s>" in a document is text, as `data pack` reads it

    encoded = encode_plain(tokenizer, texts) if texts else []
    return [[start, *ids] for ids in encoded]


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], seq_len: int, stride: int, batch_size: int = 8,
               progress: bool = True, desc: str = "perplexity") -> PplResult:
    """Sliding-window NLL of `texts`, each document on its own (see the module docstring)."""
    check_window(seq_len, stride)
    if batch_size < 1:
        raise ZhllamaError(f"batch size {batch_size} must be at least 1")
    texts = [t for t in texts if t]  # an empty document has no tokens and no characters to score
    work = []  # (token ids of the window, index of its first target inside the window)
    for ids in document_ids(tokenizer, texts):
        work.extend((ids[begin:end], first - begin) for begin, end, first in windows(len(ids), seq_len, stride))
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows up at once.
    work.sort(key=lambda w: -len(w[0]))
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    model.eval()
    nll_sum, scored = 0.0, 0
    for start in tqdm(range(0, len(work), batch_size), desc=desc, disable=not progress or None, leave=False,
                      dynamic_ncols=True):
        batch = work[start:start + batch_size]
        # The window's tokens before its first target are context only.
        labels = [[IGNORE] * first + ids[first:] for ids, first in batch]
        nll = token_nll(model, right_pad([ids for ids, _ in batch], pad, labels, device=device))
        nll_sum += float(nll.nats)
        scored += nll.count
    return PplResult(nll_sum=nll_sum, tokens=scored, chars=sum(count_chars(t) for t in texts), docs=len(texts))


class _StrictReport(ReadReport):
    """A skipped line is an error here: a perplexity over silently fewer documents is a different number."""

    def skip(self, where: str, why: str) -> None:
        raise ZhllamaError(f"{where}: {why}")


def read_documents(path: str | Path) -> list[str]:
    """The documents of one .jsonl (`text` field) or .txt (one per line) file; a bad line is a one-line error."""
    texts = list(iter_texts([path], _StrictReport()))
    if not any(texts):
        raise ZhllamaError(f"{path}: no documents to score (the file is empty or has only blank lines)")
    return texts


def _max_positions(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading the model reports a missing or broken config.json
    return config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")


def resolve_window(model_dir: str | Path, seq_len: int | None, stride: int | None) -> tuple[int, int]:
    """--seq-len (default: the model's context, at most 2048) and --stride (default: half of it), checked."""
    limit = _max_positions(Path(model_dir))
    if seq_len is None:
        seq_len = min(limit or MAX_DEFAULT_SEQ_LEN, MAX_DEFAULT_SEQ_LEN)
    if limit is not None and seq_len > limit:
        raise ZhllamaError(f"--seq-len {seq_len} is larger than the model supports ({limit} positions)")
    stride = max(1, seq_len // 2) if stride is None else stride
    check_window(seq_len, stride)
    return seq_len, stride


def format_table(rows: list[tuple[str, PplResult]]) -> str:
    header = ("file", "docs", "chars", "tokens", "ppl", "bits/char", "tokens/char")
    lines = [(name, f"{r.docs:,}", f"{r.chars:,}", f"{r.tokens:,}", f"{r.ppl:.3f}", f"{r.bits_per_char:.4f}",
              f"{r.tokens_per_char:.3f}") for name, r in rows]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    table = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in lines]
    table.append("ppl is per token and depends on the tokenizer; bits/char does not: compare a base model with "
                 "its vocabulary-extended version by bits/char.")
    return "\n".join(table)


def run_ppl(model_dir: str | Path, data: list[str | Path], seq_len: int | None = None, stride: int | None = None,
            out: str | Path | None = None, device: str = "auto", batch_size: int = 8, **load_options) -> dict:
    """Perplexity and bits per character per file and overall; prints a table, writes JSON when `out` is given."""
    from zhllama.model.loading import load_checked

    model_dir = Path(model_dir)
    paths = input_paths(list(data))
    documents = {path: read_documents(path) for path in paths}  # every input checked before the model loads
    seq_len, stride = resolve_window(model_dir, seq_len, stride)
    model, tokenizer = load_checked(model_dir, device, **load_options)  # quantize, rope, rope_factor
    results = [(str(path), perplexity(model, tokenizer, texts, seq_len, stride, batch_size, desc=path.name))
               for path, texts in documents.items()]
    overall = sum((r for _, r in results), PplResult(0.0, 0, 0))
    print(format_table([*results, ("all", overall)]))
    report = {"model": str(model_dir), "seq_len": seq_len, "stride": stride,
              "files": [{"file": name, **r.to_dict()} for name, r in results], "overall": overall.to_dict()}
    if out is not None:
        write_json_atomic(out, report)
        print(f"wrote {out}")
    return report
