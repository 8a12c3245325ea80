"""Scoring text with a causal LM: the one place that pads, shifts labels and sums fp32 cross-entropy.

Training (`train.loop.token_loss`), perplexity (`eval.ppl`), multiple choice (`eval.mc`, `eval.choice`), long
context (`eval.long`) and vocabulary extension (`model.extend_vocab.text_nll`) all score tokens the same way:

* A batch is **right-padded** (`right_pad`): every real token stays at its unpadded position, so position ids need
  no care, and causal attention plus the attention mask keep the padding out of every real token's context.
* **Labels are shifted, not the logits** (`shift_labels`): position t is scored on ``labels[t + 1]``; slicing
  the logits instead would copy the largest tensor of the step. ``IGNORE`` marks a position that is no target.
* Only the target positions go through the vocabulary projection when they are few enough (``logits_to_keep`` as
  a boolean mask, `token_nll`'s ``sparse``): for a small model the projection is most of the work.
* The **cross-entropy is taken in fp32** even under bf16 autocast: in bf16 the NLL of a confident prediction loses
  most of its digits.
* **The full logits are never built when they would be large** (`token_nll`'s ``chunked``, `zhllama.linear_ce`):
  the vocabulary projection and the cross-entropy run a chunk of target positions at a time, forward and
  backward, with the same loss and gradients. The rule (``chunked=None``): chunked whenever the targets need more
  than one chunk (`linear_ce.chunk_rows`: about 2**25 logits, e.g. more than 606 targets at 55,296 pieces) and
  the head allows it (a plain bias-free Linear, not under FSDP or DeepSpeed); otherwise, and with
  ``chunked=False``, the plain path below.

Bits per character is one metric everywhere: total NLL in nats / ln 2 / the characters of the text scored
(`count_chars`: Python characters, whitespace included; BOS and EOS are not text and are never counted).

This is a ground module: it imports torch and zhllama.errors only (and zhllama.linear_ce, itself torch and this
module), and those only inside the functions that need them, so that `zhllama.chat` (which takes ``IGNORE`` from
here) stays importable without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from zhllama.errors import ZhllamaError

if TYPE_CHECKING:
    import torch

IGNORE = -100  # the label of a position that is not a target (torch's default ignore_index)
CHUNK = 1024  # rows of logits turned into fp32 at a time when per-token losses are kept


def pad_id(tokenizer, default: int = 0) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else `default`.

    With right padding and an attention mask the pad id never reaches a real token, so any id will do; these give
    one that exists in the vocabulary.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return default


def right_pad(sequences: Sequence[Sequence[int]], pad: int, labels: Sequence[Sequence[int]] | None = None,
              width: int | None = None, device=None) -> dict[str, torch.Tensor]:
    """A batch of token sequences, right-padded to `width` (default: the longest).

    Returns int64 ``input_ids`` (`pad` after each sequence) and ``attention_mask`` (1 on real tokens), and when
    `labels` are given (one per sequence, each as long as its sequence, not shifted) ``labels`` with IGNORE on
    the padding. The tensors go to `device` when one is given.
    """
    import torch

    if not sequences:
        raise ZhllamaError("nothing to pad: the batch has no sequences")
    longest = max(len(s) for s in sequences)
    width = longest if width is None else width
    if width < longest:
        raise ZhllamaError(f"a sequence of {longest} tokens does not fit width={width}")
    n = len(sequences)
    batch = {"input_ids": torch.full((n, width), pad, dtype=torch.long),
             "attention_mask": torch.zeros((n, width), dtype=torch.long)}
    if labels is not None:
        batch["labels"] = torch.full((n, width), IGNORE, dtype=torch.long)
    for row, ids in enumerate(sequences):
        batch["input_ids"][row, :len(ids)] = torch.as_tensor(ids)
        batch["attention_mask"][row, :len(ids)] = 1
        if labels is not None:
            if len(labels[row]) != len(ids):
                raise ValueError(f"row {row}: {len(labels[row])} labels for {len(ids)} tokens")
            batch["labels"][row, :len(ids)] = torch.as_tensor(labels[row])
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """The target of every position: ``labels[:, t + 1]`` at position t, IGNORE at the last position."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def kept_logits(model, inputs: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits, projected onto the vocabulary only where the boolean (batch, seq) `keep` is True.

    With `keep` they come back flattened in (row, position) order, shape (keep.sum(), vocab); without, all of
    them, (batch, seq, vocab). In the model's dtype. No KV cache: with one, transformers skips the packed-sequence
    detection from position_ids, and every document in a packed row would attend to the ones before it.
    """
    if keep is not None:
        inputs = {**inputs, "logits_to_keep": keep}
    return model(**inputs, use_cache=False).logits


def kept_logprobs(model, inputs: Mapping[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities of every token at the `keep` positions: (keep.sum(), vocab), (row, position) order.

    For scores that are not the next token of the sequence itself (several candidate tokens at one position).
    """
    import torch

    return torch.log_softmax(kept_logits(model, inputs, keep).float(), dim=-1)


class Nll(NamedTuple):
    """Next-token negative log-likelihood (nats, fp32) of a batch and what it was summed over."""

    nats: torch.Tensor  # per="sum": 0-d; per="row": (batch,) per-row sums; per="token": (count,) per target
    count: int  # target tokens scored
    correct: int = 0  # targets that are the argmax prediction (with_accuracy only)


def token_nll(model, batch: Mapping[str, torch.Tensor], *, per: str = "sum", sparse: float = 1.0,
              with_accuracy: bool = False, chunked: bool | None = None) -> Nll:
    """Summed (or per-row, or per-token) next-token cross-entropy of ``batch["labels"]`` in fp32.

    `batch` holds the model inputs (input_ids, and attention_mask or position_ids as the layout needs) and
    unshifted ``labels`` with IGNORE where a token is no target; shifting is done here. Every tensor must be on
    the model's device. The model projects only the target positions onto the vocabulary when they are under
    `sparse` of all positions (1.0: always, since the last position is never a target; 0.0: never). `per`:
    "sum" (differentiable, for training), "row" (one sum per sequence) or "token" (each target, in (row,
    position) order). `with_accuracy` counts the targets that are the argmax prediction.

    `chunked`: True scores through `zhllama.linear_ce` (the full logits never exist; `sparse` is then moot, only
    targets are projected), and raises where the model's head does not allow it; False takes the plain path;
    None (the default) chunks when the targets need more than one chunk of logits and the head allows it.
    """
    import torch
    import torch.nn.functional as F

    if per not in ("sum", "row", "token"):
        raise ValueError(f"per must be 'sum', 'row' or 'token', got {per!r}")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = shift_labels(labels)
    counted = targets != IGNORE
    logits = None
    if chunked is not False:
        from zhllama.linear_ce import chunk_rows, chunked_nll, head_linears

        linears = head_linears(model)
        if isinstance(linears, str):
            if chunked:
                raise ZhllamaError(f"cannot chunk the cross-entropy of this model: {linears}")
        elif chunked or int(counted.sum()) > chunk_rows(linears[0].weight.shape[0]):
            nll, logits = chunked_nll(model, inputs, targets, per, with_accuracy, linears)
            if nll is not None:
                return nll
    rows = counted.nonzero()[:, 0] if per == "row" else None  # the row of every target, in (row, position) order
    keep = None
    if logits is None and (sparse >= 1 or (sparse > 0 and int(counted.sum()) < sparse * counted.numel())):
        keep, targets = counted, targets[counted]
        counted = targets != IGNORE
    if logits is None:
        logits = kept_logits(model, inputs, keep)
    flat, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if per == "sum":
        nats = F.cross_entropy(flat.float(), flat_targets, ignore_index=IGNORE, reduction="sum")
    else:  # fp32 a chunk of rows at a time: a long sequence's logits are not copied whole
        nats = torch.cat([F.cross_entropy(flat[i:i + CHUNK].float(), flat_targets[i:i + CHUNK],
                                          ignore_index=IGNORE, reduction="none")
                          for i in range(0, max(len(flat), 1), CHUNK)])
        if keep is None:  # every position was projected: keep the targets' losses only
            nats = nats[counted.reshape(-1)]
        if per == "row":
            nats = torch.zeros(len(labels), device=nats.device).index_add_(0, rows, nats)
    correct = int(((logits.argmax(-1) == targets) & counted).sum()) if with_accuracy else 0
    return Nll(nats, int(counted.sum()), correct)


def count_chars(text: str) -> int:
    """The characters of a scored text, the denominator of bits per character: every character (Unicode code
    point) of the text, whitespace included. BOS and EOS are added tokens, not text, and never count."""
    return len(text)


def bits_per_char(nats: float, chars: int) -> float:
    """Total NLL in nats / ln 2 / characters; NaN when there are no characters."""
    return nats / math.log(2) / chars if chars else float("nan")
