"""Train a Chinese SentencePiece BPE model on .txt/.jsonl input, with options that fit Llama."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from zhllama.data.readers import iter_texts
from zhllama.errors import ZhllamaError
from zhllama.tokenizer.spm import ModelProto

# sentencepiece skips sentences longer than this many bytes; longer lines are cut at sentence ends first.
MAX_SENTENCE_BYTES = 4096
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;])")
_TOO_SMALL = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


class VocabTooSmall(ZhllamaError):
    def __init__(self, vocab_size: int, required: int, coverage: float):
        super().__init__(f"--vocab-size {vocab_size} is smaller than the {required} characters needed to cover "
                         f"{coverage:.2%} of the input; raise it to at least {required + 3}")
        self.required = required


def training_sentences(paths: list[str | Path], max_chars: int | None = None) -> Iterator[str]:
    """Lines of the input, long ones cut at sentence ends, with a progress bar over characters."""
    seen = 0
    with tqdm(total=max_chars, unit="char", unit_scale=True, desc="reading", disable=None) as bar:
        for text in iter_texts(paths):
            for line in text.splitlines():
                for chunk in _chunks(line.strip()):
                    if not chunk:
                        continue
                    yield chunk
                    seen += len(chunk)
                    bar.update(len(chunk))
                    if max_chars is not None and seen >= max_chars:
                        return


def _chunks(line: str) -> Iterator[str]:
    if len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
        yield line
        return
    buf = ""
    for part in _SENTENCE_END.split(line):
        if buf and len((buf + part).encode("utf-8")) > MAX_SENTENCE_BYTES:
            yield buf
            buf = ""
        buf += part
        while len(buf.encode("utf-8")) > MAX_SENTENCE_BYTES:  # no sentence end for a long stretch
            yield buf[:1000]
            buf = buf[1000:]
    if buf:
        yield buf


def train_spm(
    inputs: list[str | Path],
    vocab_size: int,
    *,
    standalone: bool = False,
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    max_chars: int | None = None,
    user_defined_symbols: list[str] | None = None,
    **overrides,
) -> ModelProto:
    """Train a BPE model in memory and return its proto.

    Identity normalisation (so HF ids match sentencepiece's), split digits and Llama's special ids. A
    standalone model also gets byte fallback, so it can encode any text without a base tokenizer.
    """
    sentences = training_sentences(inputs, max_chars=max_chars)
    first = next(sentences, None)
    if first is None:
        raise ZhllamaError(f"no text found in {', '.join(map(str, inputs))}")
    model = io.BytesIO()
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=standalone,
        max_sentencepiece_length=16,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
        seed_sentencepiece_size=1_000_000,
    )
    options.update(overrides)
    if user_defined_symbols:
        options["user_defined_symbols"] = user_defined_symbols

    failures: list[ZhllamaError] = []

    def all_sentences():
        # An error raised inside sentencepiece's C++ loop would come back as an opaque RuntimeError.
        try:
            yield first
            yield from sentences
        except ZhllamaError as exc:
            failures.append(exc)

    try:
        spm.SentencePieceTrainer.train(sentence_iterator=all_sentences(), model_writer=model, **options)
        if failures:
            raise failures[0]
    except RuntimeError as exc:
        if failures:
            raise failures[0] from None
        message = str(exc)
        too_small = _TOO_SMALL.search(message)
        if too_small:
            raise VocabTooSmall(vocab_size, int(too_small.group(2)), character_coverage) from None
        raise ZhllamaError(f"sentencepiece training failed: {message.strip().splitlines()[-1]}") from None
    proto = ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto
