"""A briefly trained tiny model for the GGUF round trip.

A random model's logits are nearly flat, so an export error that scrambles attention (q/k not permuted for
llama.cpp's RoPE) or the weights (a wrong block layout) barely moves them or its top-1 choices. This model is
trained for a few dozen steps on the texts the round-trip test compares, so its logits are peaked there and
its attention matters. It has grouped-query attention (4 query heads, 2 KV heads), so q and k are permuted with
different head counts, and the extended 34,000-piece vocabulary of the other tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TRAIN_STEPS, LR = 30, 1e-2


def gqa_model(folder: Path, tokenizer_dir: Path, rows: int = 34_000, seed: int = 0) -> Path:
    """A random 2-layer Llama, hidden 128, 4 heads of 32 and 2 KV heads, with `tokenizer_dir`'s tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhllama.tokenizer.hf import copy_hf_tokenizer

    config = LlamaConfig(vocab_size=rows, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
    copy_hf_tokenizer(Path(tokenizer_dir), folder)
    return folder


def train_briefly(model_dir: Path, out: Path, rows: list[list[int]], steps: int = TRAIN_STEPS, lr: float = LR,
                  seed: int = 0, log: list | None = None) -> Path:
    """`model_dir` trained `steps` full-batch AdamW steps on the token rows `rows` (right-padded, padding not a
    target), saved as a complete HF folder at `out`. A plain fp32 torch loop, not the library's trainer, so the
    export tests depend on neither its precision choice nor its bugs."""
    from zhllama.model.loading import load_model

    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    model = load_model(model_dir, dtype=torch.float32).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log is not None:
                log.append(loss.item())
    folder = Path(shutil.copytree(model_dir, out))
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gguf_prompts(extended_dir, zh_heldout_texts) -> list[list[int]]:
    """What the round trip compares (and the trained model memorises): held-out Chinese, English and code."""
    from zhllama.model.loading import load_tokenizer

    tok = load_tokenizer(extended_dir)
    texts = [zh_heldout_texts[5][:200], "The quick brown fox jumps over the lazy dog.",
             'for (int i = 0; i < n; ++i) { printf("%d\\n", i); }', zh_heldout_texts[7][:200]]
    return [tok(t)["input_ids"][:96] for t in texts]


@pytest.fixture(scope="session")
def trained_zh_model(workdir, extended_dir, gguf_prompts) -> Path:
    """The GQA model above, trained TRAIN_STEPS steps on the round-trip prompts (made once per session)."""
    random_model = gqa_model(workdir / "gqa-zh-random", extended_dir)
    return train_briefly(random_model, workdir / "gqa-zh-trained", gguf_prompts)
