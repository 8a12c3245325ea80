"""Aquila-style efficiency table: tokens per character on zh/en/code, speed, and round-trip losslessness."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from zhllama.data.readers import iter_texts
from zhllama.errors import ZhllamaError
from zhllama.tokenizer.gguf_vocab import is_gguf


@dataclass
class TokenizerStats:
    name: str
    vocab_size: int
    backend: str
    tokens_per_char: dict[str, float]
    tokens: dict[str, int]
    encode_chars_per_s: float
    decode_chars_per_s: float
    lossless: bool


class _Encoder:
    """One interface over an HF folder (tokenizer.json: SentencePiece-derived or byte-level BPE), a GGUF vocabulary
    file and a bare tokenizer.model (sentencepiece)."""

    def __init__(self, source: str | Path):
        path = Path(source)
        if path.is_dir() and (path / "tokenizer.json").exists():
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(path))
            self.backend, self.vocab_size = "hf-fast", len(self.hf)
        elif path.is_file() and is_gguf(path):
            # Built in memory by the code `tokenizer from-gguf` writes a folder with: the same ids, no folder.
            self.hf = _gguf_tokenizer(path)
            self.backend, self.vocab_size = "hf-fast", len(self.hf)
        elif path.is_file() or (path / "tokenizer.model").is_file():
            import sentencepiece as spm

            from zhllama.tokenizer.spm import model_path

            self.hf = None
            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(model_path(path)))
            except (RuntimeError, OSError) as exc:  # e.g. a text file passed by mistake
                raise ZhllamaError(f"{source}: not a GGUF file nor a readable tokenizer.model ({exc})") from None
            self.backend, self.vocab_size = "sentencepiece", self.sp.get_piece_size()
        else:
            raise ZhllamaError(f"{source}: neither an HF tokenizer folder, a GGUF file nor a tokenizer.model")

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.hf is not None:
            return self.hf(texts, add_special_tokens=False)["input_ids"]
        return self.sp.encode(texts)

    def decode(self, ids: list[list[int]]) -> list[str]:
        if self.hf is not None:
            return self.hf.batch_decode(ids, skip_special_tokens=True)
        return self.sp.decode(ids)


def _gguf_tokenizer(path: Path):
    from zhllama.tokenizer import bpe, hf
    from zhllama.tokenizer.gguf_vocab import SPM_MODEL, proto_from_gguf, read_gguf_vocab

    vocab = read_gguf_vocab(path)
    if vocab["model"] == SPM_MODEL:
        return hf.build_fast_tokenizer(proto_from_gguf(path))
    return bpe.build_fast_tokenizer(vocab, path)


def measure(source: str | Path, corpora: dict[str, list[str]], name: str | None = None) -> TokenizerStats:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # long documents trip the model_max_length warning; we only count
    enc = _Encoder(source)
    per_char, counts = {}, {}
    enc_time = dec_time = 0.0
    n_chars = 0
    lossless = True
    for domain, texts in corpora.items():
        start = time.perf_counter()
        ids = enc.encode(texts)
        enc_time += time.perf_counter() - start
        start = time.perf_counter()
        back = enc.decode(ids)
        dec_time += time.perf_counter() - start
        chars = sum(map(len, texts))
        n_chars += chars
        counts[domain] = sum(map(len, ids))
        per_char[domain] = counts[domain] / max(chars, 1)
        lossless &= back == texts
    return TokenizerStats(
        name=name or str(source), vocab_size=enc.vocab_size, backend=enc.backend, tokens_per_char=per_char,
        tokens=counts, encode_chars_per_s=n_chars / max(enc_time, 1e-9),
        decode_chars_per_s=n_chars / max(dec_time, 1e-9), lossless=lossless,
    )


def load_corpora(files: dict[str, list[str | Path] | None]) -> dict[str, list[str]]:
    corpora = {}
    for domain, paths in files.items():
        if paths:
            texts = list(iter_texts(paths))
            if not texts:
                raise ZhllamaError(f"--{domain}: no text found in {', '.join(map(str, paths))}")
            corpora[domain] = texts
    if not corpora:
        raise ZhllamaError("give at least one of --zh, --en, --code")
    return corpora


def format_table(rows: list[TokenizerStats]) -> str:
    domains = list(rows[0].tokens_per_char)
    head = ["tokenizer", "vocab"] + [f"{d} tok/char" for d in domains] + ["encode char/s", "decode char/s",
                                                                          "lossless"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, f"{r.vocab_size:,}"] + [f"{r.tokens_per_char[d]:.4f}" for d in domains]
        cells += [f"{r.encode_chars_per_s:,.0f}", f"{r.decode_chars_per_s:,.0f}", "yes" if r.lossless else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_dicts(rows: list[TokenizerStats]) -> list[dict]:
    return [asdict(r) for r in rows]
