"""zhllama.scoring: padding layout, the pad-id rule, token NLL against a plain cross-entropy, bits per character."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from zhllama import scoring
from zhllama.scoring import (
    IGNORE,
    bits_per_char,
    count_chars,
    kept_logprobs,
    pad_id,
    right_pad,
    shift_labels,
    token_nll,
)

SEQS = [[1, 5, 9, 11, 3, 7, 2], [1, 40, 41], [1, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def plain_nll(model, ids: list[int], first_target: int = 1) -> torch.Tensor:
    """Per-token NLL of ids[first_target:], from the full logits of the sequence alone: no padding, no mask."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return F.cross_entropy(logits[first_target - 1:-1].float(), torch.tensor(ids[first_target:]), reduction="none")


def test_ignore_is_the_one_definition():
    from zhllama.chat import IGNORE_INDEX
    from zhllama.train.loop import IGNORE as loop_ignore

    assert IGNORE == IGNORE_INDEX == loop_ignore == -100


def test_right_pad_layout():
    batch = right_pad(SEQS, pad=0, labels=[[IGNORE, *s[1:]] for s in SEQS])
    assert batch["input_ids"].tolist() == [[1, 5, 9, 11, 3, 7, 2], [1, 40, 41, 0, 0, 0, 0], [1, 12, 13, 14, 15, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 9, 11, 3, 7, 2], [-100, 40, 41, -100, -100, -100, -100],
                                        [-100, 12, 13, 14, 15, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    wide = right_pad([[4, 5]], pad=9, width=4)
    assert set(wide) == {"input_ids", "attention_mask"}
    assert wide["input_ids"].tolist() == [[4, 5, 9, 9]] and wide["attention_mask"].tolist() == [[1, 1, 0, 0]]
    with pytest.raises(ValueError):
        right_pad([[1, 2, 3]], 0, labels=[[1, 2]])


def test_shift_labels():
    labels = torch.tensor([[-100, 5, 9, 11], [-100, 40, -100, -100]])
    assert shift_labels(labels).tolist() == [[5, 9, 11, -100], [40, -100, -100, -100]]


def test_pad_id_is_pad_else_eos_else_default():
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # 0 is an id, not a missing one
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None), default=7) == 7


@pytest.mark.parametrize("sparse", [1.0, 0.0])
def test_token_nll_is_the_plain_cross_entropy(model, sparse):
    """Padded, masked and (sparse=1) projected only at the targets, the NLL is the plain one of each sequence."""
    firsts = [1, 1, 3]  # the third sequence's first two tokens are context only
    labels = [[IGNORE] * f + s[f:] for s, f in zip(SEQS, firsts, strict=True)]
    batch = right_pad(SEQS, pad=0, labels=labels)
    per_seq = [plain_nll(model, s, f) for s, f in zip(SEQS, firsts, strict=True)]
    want_tokens = torch.cat(per_seq)
    with torch.no_grad():
        total = token_nll(model, batch, sparse=sparse)
        rows = token_nll(model, batch, per="row", sparse=sparse)
        tokens = token_nll(model, batch, per="token", sparse=sparse)
    assert total.count == rows.count == tokens.count == sum(len(s) - f for s, f in zip(SEQS, firsts, strict=True))
    assert total.nats.dim() == 0 and total.nats.dtype == torch.float32
    assert total.nats.item() == pytest.approx(want_tokens.sum().item(), abs=1e-5, rel=1e-5)
    assert torch.allclose(rows.nats, torch.stack([t.sum() for t in per_seq]), rtol=1e-5, atol=1e-5)
    assert torch.allclose(tokens.nats, want_tokens, rtol=1e-5, atol=1e-5)


def test_right_padding_does_not_change_a_score(model):
    short = SEQS[1]
    with torch.no_grad():
        alone = token_nll(model, right_pad([short], 0, [short]), per="row").nats[0].item()
        for pad in (0, 63):
            batch = right_pad([SEQS[0], short], pad, [SEQS[0], short])
            assert token_nll(model, batch, per="row").nats[1].item() == pytest.approx(alone, abs=1e-5)
    assert alone == pytest.approx(plain_nll(model, short).sum().item(), abs=1e-5)


def test_accuracy_counts_argmax_hits(model):
    batch = right_pad(SEQS, 0, SEQS)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = shift_labels(batch["labels"])
        want = int(((logits.argmax(-1) == targets) & (targets != IGNORE)).sum())
        for sparse in (1.0, 0.0):
            assert token_nll(model, batch, sparse=sparse, with_accuracy=True).correct == want


def test_training_sum_keeps_its_gradient(model):
    batch = right_pad(SEQS, 0, SEQS)
    nll = token_nll(model, batch, sparse=0.9)
    nll.nats.backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_kept_logprobs_are_the_log_softmax_at_the_kept_positions(model):
    batch = right_pad(SEQS[:2], 0)
    keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    keep[0, 3] = keep[1, 2] = True
    with torch.no_grad():
        got = kept_logprobs(model, batch, keep)
        first = F.log_softmax(model(input_ids=torch.tensor([SEQS[0]])).logits[0, 3].float(), -1)
        second = F.log_softmax(model(input_ids=torch.tensor([SEQS[1]])).logits[0, 2].float(), -1)
    assert got.shape == (2, 64) and got.dtype == torch.float32
    assert torch.allclose(got, torch.stack([first, second]), atol=1e-5)


def test_bits_per_char_and_the_character_count():
    assert bits_per_char(8 * math.log(2), 4) == pytest.approx(2.0)
    assert bits_per_char(3.0, 12) == 3.0 / math.log(2) / 12  # the formula PplResult reports, to the last bit
    assert math.isnan(bits_per_char(1.0, 0))
    # Every character of the text counts, whitespace and newlines too; BOS/EOS are tokens, not characters.
    assert count_chars("中国 a\n") == 5 and count_chars("") == 0


def test_scoring_is_a_ground_module():
    """It imports only torch, math, typing helpers, zhllama.errors and zhllama.linear_ce (the chunked head, itself
    torch and this module), and torch and linear_ce only when a function runs, so that zhllama.chat (which takes
    IGNORE from it) stays importable without torch."""
    tree = ast.parse(Path(scoring.__file__).read_text(encoding="utf-8"))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m for m in modules if m.startswith("zhllama")} == {"zhllama.errors", "zhllama.linear_ce"}
    assert modules <= {"__future__", "math", "collections.abc", "typing", "torch", "torch.nn.functional",
                       "zhllama.errors", "zhllama.linear_ce"}
    tree = ast.parse(Path(scoring.__file__).with_name("linear_ce.py").read_text(encoding="utf-8"))
    chunked = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    chunked |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert chunked <= {"__future__", "functools", "torch", "torch.nn.functional", "zhllama.errors",
                       "zhllama.scoring", "liger_kernel.transformers.functional"}
    code = "import sys, zhllama.chat, zhllama.scoring; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
