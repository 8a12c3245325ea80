"""Per-span attention over packed rows equals SDPA with transformers' block-diagonal mask, values and gradients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zhllama.train.varlen import register


def run(model, impl, **inputs):
    model.zero_grad()
    model.config._attn_implementation = impl
    logits = model(**inputs, use_cache=False).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_equals_sdpa_with_the_packed_mask(kv_heads):
    name = register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 120, (3, 14))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5],  # three conversations
                              [*range(14)],  # one
                              [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 0, 1]])  # one, then padding as its own run
    want, want_grads = run(model, "sdpa", input_ids=ids, position_ids=positions)
    got, got_grads = run(model, name, input_ids=ids, position_ids=positions)
    assert torch.allclose(got, want, atol=1e-5)
    assert all(torch.allclose(got_grads[n], want_grads[n], atol=1e-5) for n in want_grads)
    alone, _ = run(model, "sdpa", input_ids=ids[:1, 5:8])
    assert torch.allclose(got[0, 5:8], alone[0], atol=1e-5)  # the second conversation sees nothing before it
    # Without restarting positions, or with a padding mask, it is SDPA itself.
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
        want, _ = run(model, "sdpa", **inputs)
        got, _ = run(model, name, **inputs)
        assert torch.equal(got, want)
