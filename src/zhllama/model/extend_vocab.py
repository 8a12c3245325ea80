"""Grow a model's embedding and output matrices to a tokenizer that extends the model's own.

New rows start as the mean of the rows of the base tokens each new piece replaces ("mean"), so the model
reads "中国" roughly as it read the bytes or characters that spelled it before, and predicts it roughly as
likely as their average. "random" is the baseline it is measured against.

Two tokenizer families: SentencePiece (tokenizer.model: ours, Llama-2) and BPE with tokenizer.json only (Llama-3's
byte-level BPE). The model's own folder holds the base tokenizer; the new one must be of the same family.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import sentencepiece as spm
import torch

from zhllama.artifacts import atomic_output_dir, write_provenance
from zhllama.errors import ZhllamaError
from zhllama.model.loading import load_model, load_tokenizer, tokenizer_kind, tokenizer_sha256
from zhllama.scoring import count_chars, pad_id, right_pad, token_nll
from zhllama.tokenizer.hf import copy_hf_tokenizer
from zhllama.tokenizer.spm import NORMAL, USER_DEFINED, ModelProto, load_proto

INIT_METHODS = ("mean", "random")


def check_extends(base: ModelProto, new: ModelProto, rows: int, base_name: str, new_name: str) -> None:
    """Raise unless `new` keeps the first `rows` pieces of `base` exactly: same id, text, score and type."""
    if len(base.pieces) != rows:
        raise ZhllamaError(f"{base_name} has {len(base.pieces)} pieces but the model has {rows} embedding rows; "
                           f"the model folder needs the tokenizer it was trained with")
    for i, (old, fresh) in enumerate(zip(base.pieces, new.pieces, strict=False)):
        if (old.piece, old.score, old.type) != (fresh.piece, fresh.score, fresh.type):
            raise ZhllamaError(
                f"tokenizer {new_name} does not extend the model's tokenizer ({rows} pieces -> "
                f"{len(new.pieces)}): piece {i} is {old.piece!r} (score {old.score:g}, type {old.type}) in the "
                f"model but {fresh.piece!r} (score {fresh.score:g}, type {fresh.type}) in the new tokenizer")
    if len(new.pieces) <= rows:
        relation = "the same number as" if len(new.pieces) == rows else "fewer than"
        raise ZhllamaError(f"new tokenizer {new_name} has {len(new.pieces)} pieces, {relation} the model's "
                           f"{rows} embedding rows; nothing to extend")


def base_splits(base: ModelProto, new_pieces) -> list[list[int]]:
    """For each new piece, the base ids that spell the same text; [] where there is no text to spell.

    The piece is encoded on its own, so the dummy "▁" the base model prepends to a whole text must not be
    added: "中国" is then spelled as the base would spell it in the middle of a sentence, and "▁中国" keeps its
    own leading "▁" from the piece itself.
    """
    plain = copy.deepcopy(base)
    plain.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=plain.SerializeToString())
    splits = []
    for piece in new_pieces:
        # Control, unknown and padding pieces never come from text (sentencepiece encodes "<pad_40001>" as
        # literal characters), so they have no spelling.
        if piece.type not in (NORMAL, USER_DEFINED):
            splits.append([])
            continue
        splits.append(sp.encode(piece.piece.replace("▁", " ")))
    return splits


def bpe_table(tok, name: str) -> list[tuple[str, str]]:
    """Every token of a loaded BPE tokenizer by id, as (text, kind): kind "special" or "added" for added tokens, ""
    for the model's own vocabulary (an added token that is also in the vocabulary, as Llama-3's specials are,
    counts as added).

    Read from the tokenizer as loaded, not from tokenizer.json: the tokenizers library gives an added token that is
    not in the vocabulary the next free id, whatever id the file states, and those are the ids the model sees.
    """
    from tokenizers.models import BPE

    backend = tok.backend_tokenizer
    if not isinstance(backend.model, BPE):
        raise ZhllamaError(f"{name}: a {type(backend.model).__name__} tokenizer; model extend-vocab takes "
                           "SentencePiece (tokenizer.model) or BPE tokenizers")
    table: dict[int, tuple[str, str]] = {}
    for text, i in backend.get_vocab(with_added_tokens=True).items():
        if i in table:
            raise ZhllamaError(f"{name}: tokens {table[i][0]!r} and {text!r} both have id {i}; the tokenizer.json "
                               "gives an added token an id the vocabulary already uses")
        table[i] = (text, "")
    for i, added in backend.get_added_tokens_decoder().items():
        table[i] = (added.content, "special" if added.special else "added")
    if sorted(table) != list(range(len(table))):
        raise ZhllamaError(f"{name}: token ids are not 0..{len(table) - 1} without gaps")
    return [table[i] for i in range(len(table))]


def check_extends_bpe(base: list[tuple[str, str]], new: list[tuple[str, str]], rows: int, base_name: str,
                      new_name: str) -> None:
    """Raise unless `new` keeps the first `rows` tokens of `base` exactly: same id, text and added/special kind."""
    if len(base) != rows:
        raise ZhllamaError(f"{base_name} has {len(base)} tokens but the model has {rows} embedding rows; "
                           f"the model folder needs the tokenizer it was trained with")

    def show(token: tuple[str, str]) -> str:
        return repr(token[0]) + (f" ({token[1]})" if token[1] else "")

    for i, (old, fresh) in enumerate(zip(base, new, strict=False)):
        if old != fresh:
            raise ZhllamaError(f"tokenizer {new_name} does not extend the model's tokenizer ({rows} tokens -> "
                               f"{len(new)}): token {i} is {show(old)} in the model but {show(fresh)} in the new "
                               "tokenizer")
    if len(new) <= rows:
        relation = "the same number as" if len(new) == rows else "fewer than"
        raise ZhllamaError(f"new tokenizer {new_name} has {len(new)} pieces, {relation} the model's "
                           f"{rows} embedding rows; nothing to extend")


def bpe_base_splits(base_tok, new_tok, new_table: list[tuple[str, str]], rows: int) -> list[list[int]]:
    """For each new BPE token (ids from `rows` on), the base ids that spell its text; [] where there is none.

    A vocabulary token's text is the token decoded (byte-level "ä¸ŃåĽ½" is "中国"), encoded by the base tokenizer
    without BOS. A token that is only part of a UTF-8 character decodes to U+FFFD, so its own symbols go through the
    base BPE model instead (the merges alone, no pre-tokenizer), which splits the same bytes. Special added tokens
    never come from text, so they have no spelling, as SentencePiece control pieces.
    """
    base_model = base_tok.backend_tokenizer.model
    splits = []
    for i, (token, kind) in enumerate(new_table[rows:], start=rows):
        if kind == "special":
            splits.append([])
            continue
        text = token if kind == "added" else new_tok.backend_tokenizer.decode([i], skip_special_tokens=False)
        if text and "\ufffd" not in text:
            splits.append(list(base_tok(text, add_special_tokens=False)["input_ids"]))
        else:
            splits.append([t.id for t in base_model.tokenize(token)])
    return splits


@torch.no_grad()
def _fill_mean(weight: torch.Tensor, rows: int, splits: list[list[int]]) -> None:
    base = weight[:rows].float()  # average in float32 even for a bf16 checkpoint
    overall = base.mean(dim=0)
    for offset, ids in enumerate(splits):
        weight[rows + offset] = (base[ids].mean(dim=0) if ids else overall).to(weight.dtype)


@torch.no_grad()
def _fill_random(weight: torch.Tensor, rows: int, std: float, generator: torch.Generator) -> None:
    fresh = torch.randn(weight.shape[0] - rows, weight.shape[1], generator=generator) * std
    weight[rows:] = fresh.to(weight.dtype)


def extend_vocab(model_dir: str | Path, tokenizer_dir: str | Path, out: str | Path, init: str = "mean",
                 seed: int = 0) -> Path:
    """Write `model_dir` resized to the tokenizer in `tokenizer_dir`, which must extend the model's own."""
    if init not in INIT_METHODS:
        raise ZhllamaError(f"unknown --init {init!r}; choose one of {', '.join(INIT_METHODS)}")
    model_dir, tokenizer_dir = Path(model_dir), Path(tokenizer_dir)
    for folder, what in ((model_dir, "model"), (tokenizer_dir, "tokenizer")):
        if not folder.is_dir():
            raise ZhllamaError(f"{what} folder {folder} does not exist")
    if not any((model_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise ZhllamaError(f"{model_dir} has no tokenizer.model or tokenizer.json; copy the tokenizer the model "
                           f"was trained with into it, so the new tokenizer can be checked against it")
    kind, new_kind = tokenizer_kind(model_dir), tokenizer_kind(tokenizer_dir)
    if kind != new_kind:
        names = {"spm": "SentencePiece (tokenizer.model)", "bpe": "BPE (tokenizer.json only)"}
        raise ZhllamaError(f"tokenizer {tokenizer_dir} does not extend the model's tokenizer: the model's is "
                           f"{names[kind]}, the new one {names[new_kind]}")
    model = load_model(model_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    new_tok = load_tokenizer(tokenizer_dir)
    new_size = len(new_tok)
    if kind == "spm":
        base, new = load_proto(model_dir), load_proto(tokenizer_dir)
        check_extends(base, new, rows, f"{model_dir}/tokenizer.model", str(tokenizer_dir))
        new_count = len(new.pieces)
    else:
        base_tok = load_tokenizer(model_dir)
        base_table, new_table = bpe_table(base_tok, str(model_dir)), bpe_table(new_tok, str(tokenizer_dir))
        check_extends_bpe(base_table, new_table, rows, f"{model_dir}/tokenizer.json", str(tokenizer_dir))
        new_count = len(new_table)
    # The HF files must agree with the vocabulary file, or ids from AutoTokenizer would index the wrong rows.
    if new_size != new_count:
        raise ZhllamaError(f"{tokenizer_dir}: {'tokenizer.model' if kind == 'spm' else 'tokenizer.json'} has "
                           f"{new_count} pieces but the Hugging Face tokenizer files have {new_size} tokens")

    model.resize_token_embeddings(new_size, mean_resizing=False)
    model.config.vocab_size = new_size
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != matrices[0].data_ptr():  # tied weights: fill once
        matrices.append(head.weight)
    if init == "mean":
        if kind == "spm":
            splits = base_splits(base, new.pieces[rows:])
        else:
            splits = bpe_base_splits(base_tok, new_tok, new_table, rows)
        for weight in matrices:
            _fill_mean(weight, rows, splits)
    else:
        generator = torch.Generator().manual_seed(seed)
        for weight in matrices:
            _fill_random(weight, rows, model.config.initializer_range, generator)

    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        copy_hf_tokenizer(tokenizer_dir, tmp)
        write_provenance(
            tmp, "model extend-vocab",
            {"model": model_dir, "tokenizer": tokenizer_dir, "init": init, "seed": seed},
            {"base_tokenizer": tokenizer_sha256(model_dir), "tokenizer": tokenizer_sha256(tokenizer_dir)},
            base_vocab_size=rows, vocab_size=new_size)
    return Path(out)


@torch.no_grad()
def text_nll(model_dir: str | Path, texts: list[str], max_tokens: int = 512,
             batch_size: int = 8) -> dict[str, float]:
    """Total next-token cross-entropy (nats) over `texts`, with the tokens and characters it covers.

    Each text starts with BOS (context, not a target) and is cut to `max_tokens` tokens. The characters are those
    of the text scored (zhllama.scoring.count_chars, as `eval ppl` counts them): all of it, or for a text cut at
    `max_tokens`, up to the end of its last token kept. So nats per character compares models with different
    tokenizers fairly.
    """
    if max_tokens < 2:
        raise ZhllamaError(f"max_tokens must be at least 2, got {max_tokens}")
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    model.eval()
    texts = list(texts)
    enc = tok(texts, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
    seqs, chars = [], 0
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        if len(ids) < 2:
            continue  # no token to predict
        seqs.append(ids)
        cut = len(ids) == max_tokens and len(tok(text)["input_ids"]) > max_tokens
        chars += count_chars(text[:max(end for _, end in offsets)] if cut else text)
    nats, tokens = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start:start + batch_size]
        nll = token_nll(model, right_pad(batch, pad_id(tok), labels=batch))
        nats, tokens = nats + nll.nats.item(), tokens + nll.count
    return {"nats": nats, "tokens": tokens, "chars": chars}


def initial_loss(model_dir: str | Path, texts: list[str], max_tokens: int = 512, per: str = "token") -> float:
    """Mean next-token loss of the model in `model_dir` on `texts`, per token or (per="char") per character."""
    if per not in ("token", "char"):
        raise ZhllamaError(f"per must be 'token' or 'char', got {per!r}")
    stats = text_nll(model_dir, texts, max_tokens)
    count = stats["tokens"] if per == "token" else stats["chars"]
    return stats["nats"] / count if count else math.nan
