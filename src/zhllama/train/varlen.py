"""Attention over packed rows, one conversation at a time: the CPU counterpart of flash-attention's varlen kernel.

With a block-diagonal mask, SDPA still computes every pair of positions in a row and throws most of them away; for
rows of 1,024 tokens holding two or three conversations that is half the attention work. Here each conversation's
span (where the positions restart at 0) goes through SDPA on its own with ``is_causal=True``, which computes only
the pairs that count and lets SDPA use its fused causal kernel. The result equals SDPA with the block mask (tested).

Registered with transformers' AttentionInterface as ``"zhllama_varlen"``; the training loop selects it. Batches
without restarting positions, with a padding mask, or with a KV cache go to transformers' SDPA unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "zhllama_varlen"


def _spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of every run of positions that restarts at 0."""
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        out.append(list(zip(starts, [*starts[1:], len(row)], strict=True)))
    return out


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (position_ids is not None and attention_mask is None and query.shape[2] == key.shape[2]
              and query.shape[2] > 1)
    spans = _spans(position_ids.expand(query.shape[0], -1)) if packed else None
    if not packed or all(len(row) == 1 for row in spans):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    rows = []
    for b, row in enumerate(spans):
        pieces = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                                 value[b:b + 1, :, s:e], dropout_p=dropout, scale=scaling,
                                                 is_causal=True, enable_gqa=groups > 1)
                  for s, e in row]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                attention_mask=None, **kwargs):
    """No mask where the attention needs none: causal, no padding, no cache. Then the spans of restarting
    positions say everything, and building the (rows, 1, L, L) block mask would be wasted work."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make ``attn_implementation="zhllama_varlen"`` available to transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
    return NAME
