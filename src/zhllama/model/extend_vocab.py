"""Grow a model's embedding and output matrices to a tokenizer that extends the model's own.

New rows start as the mean of the rows of the base tokens each new piece replaces ("mean"), so the model
reads "中国" roughly as it read the bytes or characters that spelled it before, and predicts it roughly as
likely as their average. "random" is the baseline it is measured against.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import sentencepiece as spm
import torch

from zhllama.artifacts import atomic_output_dir, file_sha256, write_provenance
from zhllama.errors import ZhllamaError
from zhllama.model.init import first_line, load_tokenizer, require_hf_folder
from zhllama.scoring import count_chars, pad_id, right_pad, token_nll
from zhllama.tokenizer.hf import copy_hf_tokenizer
from zhllama.tokenizer.spm import NORMAL, USER_DEFINED, ModelProto, load_proto

INIT_METHODS = ("mean", "random")


def load_model(model_dir: str | Path, **kwargs):
    from transformers import AutoModelForCausalLM

    model_dir = require_hf_folder(model_dir)
    if not model_dir.is_dir():
        raise ZhllamaError(f"model folder {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ZhllamaError(f"{model_dir} has no config.json; not a Hugging Face model folder")
    try:
        # "auto" keeps the checkpoint's dtype: a bf16 7B model must not double in memory.
        kwargs.setdefault("dtype", "auto")
        return AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ZhllamaError(f"{model_dir}: cannot load the model ({first_line(exc)})") from None


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
    if not (model_dir / "tokenizer.model").is_file():
        raise ZhllamaError(f"{model_dir} has no tokenizer.model; copy the SentencePiece tokenizer the model "
                           f"was trained with into it, so the new tokenizer can be checked against it")
    base, new = load_proto(model_dir), load_proto(tokenizer_dir)
    model = load_model(model_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    check_extends(base, new, rows, f"{model_dir}/tokenizer.model", str(tokenizer_dir))
    # The HF files must agree with the proto, or ids from AutoTokenizer would index the wrong rows.
    new_size = len(load_tokenizer(tokenizer_dir))
    if new_size != len(new.pieces):
        raise ZhllamaError(f"{tokenizer_dir}: tokenizer.model has {len(new.pieces)} pieces but the Hugging Face "
                           f"tokenizer files have {new_size} tokens")

    model.resize_token_embeddings(new_size, mean_resizing=False)
    model.config.vocab_size = new_size
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != matrices[0].data_ptr():  # tied weights: fill once
        matrices.append(head.weight)
    if init == "mean":
        splits = base_splits(base, new.pieces[rows:])
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
            {"base_tokenizer": file_sha256(model_dir / "tokenizer.model"),
             "tokenizer": file_sha256(tokenizer_dir / "tokenizer.model")},
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
