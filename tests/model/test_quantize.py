"""Quantised loading (zhllama.model.quantize through load_checked): CPU int8 dynamic quantisation for real, the
refusals, and the bitsandbytes paths where a CUDA GPU is present.

Accuracy is measured on `trained_base` (tests/model/conftest.py): a random model predicts nearly uniformly, so its
top-1 token flips under any noise and says nothing about the quantisation. On the texts the trained model knows,
int8 measured top-1 agreement 0.99 with fp32 and a relative logit error (L2) of 0.015; the bounds below leave room.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from zhllama.errors import ZhllamaError
from zhllama.model import quantize
from zhllama.model.loading import load_checked
from zhllama.model.quantize import bnb_config, check_kind, quantized_linear_count

TOP1_AGREEMENT = 0.95
RELATIVE_L2 = 0.05
TINY_LINEARS = 4 * 7  # 4 layers x (q k v o gate up down); lm_head stays fp32


@pytest.fixture(scope="module")
def fp32_and_int8(trained_base):
    base, tokenizer = load_checked(trained_base, "cpu")
    int8, _ = load_checked(trained_base, "cpu", quantize="int8")
    return base, int8, tokenizer


def test_cpu_int8_quantizes_the_decoder_linears(fp32_and_int8):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    base, int8, _ = fp32_and_int8
    assert quantized_linear_count(base) == 0 and quantized_linear_count(int8) == TINY_LINEARS
    assert isinstance(int8.model.layers[0].self_attn.q_proj, DynamicLinear)
    assert isinstance(int8.model.layers[-1].mlp.down_proj, DynamicLinear)
    assert type(int8.lm_head) is torch.nn.Linear and int8.lm_head.weight.dtype == torch.float32
    assert not int8.training


def test_cpu_int8_logits_stay_close_to_fp32(fp32_and_int8, known_texts):
    base, int8, tokenizer = fp32_and_int8
    agree = total = 0
    for text in known_texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            reference, quantized = base(ids).logits, int8(ids).logits
        assert (quantized - reference).norm() / reference.norm() < RELATIVE_L2
        agree += (quantized.argmax(-1) == reference.argmax(-1)).sum().item()
        total += ids.shape[1]
    assert agree / total >= TOP1_AGREEMENT


def test_cpu_int8_greedy_generate_runs(fp32_and_int8, known_texts):
    _, int8, tokenizer = fp32_and_int8
    ids = torch.tensor([tokenizer(known_texts[0][:6])["input_ids"]])
    out = int8.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8) and torch.equal(out[:, :ids.shape[1]], ids)


def test_int4_on_cpu_is_refused_before_loading(tmp_path):
    # the folder does not exist: the refusal comes first, not after reading any weight
    with pytest.raises(ZhllamaError, match=r"int4 needs a CUDA GPU \(bitsandbytes\); on CPU use --quantize int8"):
        load_checked(tmp_path / "missing", "cpu", quantize="int4")


def test_unknown_kind_is_an_error(tmp_path):
    with pytest.raises(ZhllamaError, match="--quantize must be one of int8, int4, got 'fp8'"):
        load_checked(tmp_path / "missing", "cpu", quantize="fp8")
    with pytest.raises(ZhllamaError, match="must be one of"):
        bnb_config("nf4")


def test_gpu_without_bitsandbytes_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(quantize.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ZhllamaError, match="needs the bitsandbytes package: pip install bitsandbytes"):
        check_kind("int4", "cuda")


def test_bnb_settings():
    int8, int4 = bnb_config("int8"), bnb_config("int4")
    assert int8.load_in_8bit and not int8.load_in_4bit
    assert int4.load_in_4bit and int4.bnb_4bit_quant_type == "nf4" and int4.bnb_4bit_use_double_quant


needs_bnb_gpu = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                                   reason="bitsandbytes quantisation needs a CUDA GPU and the bitsandbytes package")


@needs_bnb_gpu
@pytest.mark.parametrize("kind, layer", [("int8", "Linear8bitLt"), ("int4", "Linear4bit")])
def test_gpu_bitsandbytes_loads_and_generates(trained_base, known_texts, kind, layer):
    model, tokenizer = load_checked(trained_base, "cuda", quantize=kind)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == layer
    assert quantized_linear_count(model) == TINY_LINEARS
    ids = torch.tensor([tokenizer(known_texts[0][:6])["input_ids"]], device="cuda")
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
