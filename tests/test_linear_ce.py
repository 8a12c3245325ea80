"""zhllama.linear_ce: the chunked head gives the plain path's loss and gradients without building the full logits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from zhllama import linear_ce
from zhllama.config import TrainConfig
from zhllama.errors import ZhllamaError
from zhllama.scoring import IGNORE, right_pad, token_nll
from zhllama.train.trainable import prepare_trainable

VOCAB, HIDDEN, ROWS = 1000, 32, 7  # ROWS targets per chunk: every batch below takes several chunks
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(linear_ce, "CHUNK_LOGITS", ROWS * VOCAB)
    monkeypatch.setattr(linear_ce, "MIN_ROWS", 1)


def tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()  # eval: no dropout anywhere, so two forwards are the same function
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def sft_batch() -> dict[str, torch.Tensor]:
    """Right-padded rows whose prompts are masked: only the replies are targets (SFT)."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (30, 17, 25)]
    labels = [[IGNORE] * p + s[p:] for s, p in zip(seqs, (8, 5, 12), strict=True)]
    return right_pad(seqs, 0, labels)


def packed_batch() -> dict[str, torch.Tensor]:
    """Packed rows: positions restart at each conversation, no attention mask, prompts masked."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 32), generator=g)
    positions = torch.cat([torch.arange(12), torch.arange(20)]).repeat(2, 1)
    positions[1] = torch.cat([torch.arange(9), torch.arange(15), torch.arange(8)])
    labels = ids.clone()
    labels[0, :4] = labels[0, 12:17] = labels[1, :3] = labels[1, 9:13] = labels[1, 24:26] = IGNORE
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


BATCHES = {"sft": sft_batch, "packed": packed_batch}


class VocabShapes(TorchDispatchMode):
    """Records the rows of every 2-D tensor an op makes with VOCAB columns (logits and their gradients)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == VOCAB and t.shape[0] != HIDDEN:
                self.rows.append(t.shape[0])  # (HIDDEN, VOCAB) is the weight's transpose, not logits
        return out


def loss_and_grads(model, batch, per: str, chunked: bool, weights: torch.Tensor | None = None):
    """The scored NLL and the gradient of every parameter that gets one (per row/token: of a weighted sum)."""
    model.zero_grad(set_to_none=True)
    with VocabShapes() as probe:
        nll = token_nll(model, batch, per=per, sparse=0.9, chunked=chunked)
        loss = nll.nats if per == "sum" else (nll.nats * weights[:len(nll.nats)]).sum()
        loss.backward()
    if chunked and not (nll.nats.is_cuda and linear_ce._liger()):  # it took the chunked path, both ways
        assert probe.rows and max(probe.rows) <= ROWS, probe.rows
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return nll, grads


def assert_same(model, batch, per="sum", other=None, **tol):
    """The chunked path on `model` against the plain path on `other` (default: the same model)."""
    tol = tol or TOL
    weights = torch.linspace(0.5, 2.0, 200)
    plain, want = loss_and_grads(other or model, batch, per, False, weights)
    chunked, got = loss_and_grads(model, batch, per, True, weights)
    assert chunked.count == plain.count > 3 * ROWS
    torch.testing.assert_close(chunked.nats, plain.nats, **tol)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
    return want


@pytest.mark.parametrize("layout", ["sft", "packed"])
@pytest.mark.parametrize("per", ["sum", "row", "token"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_and_every_gradient_equal_the_plain_path(tied, per, layout):
    model = tiny(tied)
    want = assert_same(model, BATCHES[layout](), per)
    assert len(want) == len(list(model.parameters()))  # every weight has its gradient compared


@pytest.mark.parametrize("train_embeddings", [False, True], ids=["frozen-head", "modules-to-save"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_adapters_and_saved_modules_get_the_same_gradients(tied, train_embeddings):
    cfg = TrainConfig(trainable="lora")
    cfg.lora.dropout = 0.0
    cfg.lora.train_embeddings = train_embeddings
    model = prepare_trainable(tiny(tied), cfg).eval()
    torch.manual_seed(3)
    for name, p in model.named_parameters():  # LoRA's B starts at 0: give every adapter a gradient path
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    for per in ("sum", "row"):
        want = assert_same(model, sft_batch(), per)
        assert any("lora_A" in n for n in want)
        assert any("lm_head" in n for n in want) == train_embeddings


def test_new_rows_hook_sees_the_whole_gradient():
    """`trainable new-rows` zeroes the base rows' gradient with a hook on the weights: it applies as before."""
    model = prepare_trainable(tiny(False), TrainConfig(trainable="new-rows"), base_rows=900)
    want = assert_same(model, sft_batch())
    assert not want["lm_head.weight"][:900].any() and want["lm_head.weight"][900:].any()


def test_no_grad_scores_and_accuracy_equal_the_plain_path():
    model, batch = tiny(False), sft_batch()
    with torch.no_grad():
        for per in ("sum", "row", "token"):
            plain = token_nll(model, batch, per=per, with_accuracy=True, chunked=False)
            chunked = token_nll(model, batch, per=per, with_accuracy=True, chunked=True)
            torch.testing.assert_close(chunked.nats, plain.nats, **TOL)
            assert (chunked.count, chunked.correct) == (plain.count, plain.correct)
    # An untrained model rarely guesses right: make it guess the targets so the count means something.
    with torch.no_grad():
        model.lm_head.weight[batch["labels"][0, 9:20]] += 3 * model.lm_head.weight.std()
        plain = token_nll(model, batch, with_accuracy=True, chunked=False)
        assert plain.correct > 0
        assert token_nll(model, batch, with_accuracy=True, chunked=True).correct == plain.correct


@pytest.mark.parametrize("per", ["sum", "row"])
def test_the_full_logits_never_exist(per):
    model, batch = tiny(False), sft_batch()
    for chunked in (False, True):
        with VocabShapes() as probe:
            nll = token_nll(model, batch, per=per, chunked=chunked)
            nll.nats.sum().backward()
        if chunked:
            assert probe.rows and max(probe.rows) <= ROWS, probe.rows
        else:  # the probe does see the plain path's logits
            assert max(probe.rows) == nll.count


def test_bf16_autocast_matches_the_plain_bf16_path():
    """Under autocast both paths make bf16 logits and take the cross-entropy in fp32. Each logit is the same bf16
    number unless the two matmuls accumulate in another order and round to a neighbour (1 bf16 ulp, 2**-8
    relative): the losses agree to ~1e-4 relative. The gradients are bf16 products either way; the chunked
    weight gradient is summed over chunks in fp32 rather than rounded once in bf16, so they agree to about a
    bf16 ulp of each gradient's scale (measured 3e-3 of the largest entry; 1e-2 allowed)."""
    model, batch = tiny(False), sft_batch()
    results = []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = token_nll(model, batch, sparse=0.9, chunked=chunked)
        nll.nats.backward()
        assert nll.nats.dtype == torch.float32
        results.append((nll.nats.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, want), (chunked, got) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=0)
    for name in want:
        scale = want[name].abs().max()
        assert (got[name] - want[name]).abs().max() <= 1e-2 * scale, name
        assert got[name].dtype == want[name].dtype == torch.float32


def test_ddp_sees_the_head_used_inside_its_forward(tmp_path):
    """Under DDP (one gloo process) the head runs inside the wrapper's forward: with find_unused_parameters the
    reducer searches the graph from the outputs, and a head used outside it would be marked unused and then
    ready a second time in backward (an error)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        pytest.skip("a multi-process group is already running")
    try:
        plain = tiny(False)
        ddp = DistributedDataParallel(copy.deepcopy(plain), find_unused_parameters=True)
        for per in ("sum", "row"):
            weights = torch.linspace(0.5, 2.0, 200)
            base, want = loss_and_grads(plain, sft_batch(), per, False, weights)
            nll, got = loss_and_grads(ddp, sft_batch(), per, True, weights)
            torch.testing.assert_close(nll.nats, base.nats, **TOL)
            assert {f"module.{n}" for n in want} == set(got)
            for name in want:
                torch.testing.assert_close(got[f"module.{name}"], want[name], **TOL)
    finally:
        if started:
            dist.destroy_process_group()


class QuantisedLinear(torch.nn.Linear):
    """A stand-in for a quantised head (bitsandbytes' Linear4bit is an nn.Linear subclass too)."""


def test_a_head_it_does_not_know_falls_back_or_refuses():
    model, batch = tiny(False), sft_batch()
    head = QuantisedLinear(HIDDEN, VOCAB, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    assert "QuantisedLinear" in linear_ce.head_linears(model)
    with torch.no_grad():
        auto = token_nll(model, batch)
        torch.testing.assert_close(auto.nats, token_nll(model, batch, chunked=False).nats)
        with pytest.raises(ZhllamaError, match="QuantisedLinear"):
            token_nll(model, batch, chunked=True)


def test_the_automatic_rule(monkeypatch):
    """Chunked when the targets need more than one chunk; the plain path for fewer, and with chunked=False."""
    calls = []
    real = linear_ce.chunked_nll
    monkeypatch.setattr(linear_ce, "chunked_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, batch = tiny(False), sft_batch()
    with torch.no_grad():
        token_nll(model, batch)
        assert len(calls) == 1
        token_nll(model, batch, chunked=False)
        monkeypatch.setattr(linear_ce, "CHUNK_LOGITS", 1000 * VOCAB)  # one chunk holds every target
        token_nll(model, batch)
    assert len(calls) == 1


def test_the_training_objective_takes_the_chunked_path(monkeypatch):
    from zhllama.train.objective import LanguageModelling

    calls = []
    real = linear_ce.chunked_nll
    monkeypatch.setattr(linear_ce, "chunked_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, batch = tiny(True), packed_batch()
    loss, _ = LanguageModelling()(model, batch)
    loss.backward()
    assert calls and model.lm_head.weight.grad.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernel needs CUDA")
def test_liger_on_cuda_matches_the_plain_path():
    pytest.importorskip("liger_kernel")
    assert linear_ce._liger() is not None
    model, batch = tiny(False).cuda(), {k: v.cuda() for k, v in sft_batch().items()}
    want = assert_same(model, batch, "sum", atol=1e-4, rtol=1e-4)
    assert "lm_head.weight" in want


def test_a_second_backward_through_a_retained_graph_is_refused():
    """The training sum's gradients are computed in forward and scaled in place by its one backward."""
    torch.manual_seed(0)
    hidden = torch.randn(20, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (20,))
    loss = linear_ce.linear_nll(hidden, weight, targets, summed=True)
    (loss * 0.5).backward(retain_graph=True)
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    (0.5 * torch.nn.functional.cross_entropy(h @ w.t(), targets, reduction="sum")).backward()
    assert torch.allclose(hidden.grad, h.grad, **TOL) and torch.allclose(weight.grad, w.grad, **TOL)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
