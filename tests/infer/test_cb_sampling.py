"""The fast top-k/top-p processors give exactly what transformers' batch versions give."""

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from zhllama.infer.cb_sampling import NO_TOP_K, FastTopK, FastTopP


def test_fast_top_k_equals_transformers():
    torch.manual_seed(0)
    scores = torch.randn(5, 1000)
    ks = torch.tensor([1, 50, NO_TOP_K, 3, 1000], dtype=torch.int32)
    reference = ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=50))
    fast = FastTopK(reference)
    # transformers has no "off" value: its equivalent of NO_TOP_K is k = vocabulary size
    expected = reference(scores, torch.where(ks == NO_TOP_K, 1000, ks))
    assert torch.equal(fast(scores, ks), expected)
    assert (fast(scores, ks)[0] > -float("inf")).sum() == 1 and (fast(scores, ks)[1] > -float("inf")).sum() == 50
    untouched = torch.full((5,), NO_TOP_K, dtype=torch.int32)
    assert fast(scores, untouched) is scores


def test_fast_top_p_equals_transformers():
    torch.manual_seed(1)
    scores = torch.randn(4, 1000) * 3
    ps = torch.tensor([0.9, 1.0, 0.5, 0.1], dtype=torch.float32)
    reference = ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(top_p=0.9))
    fast = FastTopP(reference)
    args = ps.view(torch.int32)
    assert torch.equal(fast(scores, args), reference(scores, args))
    assert fast(scores, torch.ones(4).view(torch.int32)) is scores


def test_inverse_cdf_sampler_is_exact_and_never_picks_a_cut_token():
    from zhllama.infer.cb_sampling import InverseCdfSampler

    torch.manual_seed(2)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = probs.log().expand(40_000, 4).contiguous()
    picked = InverseCdfSampler()(None, scores).argmax(-1)
    freq = torch.bincount(picked, minlength=4).float() / 40_000
    assert torch.allclose(freq, probs, atol=0.01)
    assert freq[3] == 0
    one_hot = torch.full((3, 1000), float("-inf"))
    one_hot[torch.arange(3), torch.tensor([5, 999, 0])] = 1.0
    assert InverseCdfSampler()(None, one_hot).argmax(-1).tolist() == [5, 999, 0]
