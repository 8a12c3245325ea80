"""A freshly initialised Llama model with a given tokenizer, saved as a complete Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch

from zhllama.artifacts import atomic_output_dir, check_output_path, write_provenance
from zhllama.model.loading import load_tokenizer, tokenizer_sha256
from zhllama.model.presets import get_preset, llama_config
from zhllama.tokenizer.hf import copy_hf_tokenizer


def init_model(preset: str, tokenizer_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Random weights for `preset`, sized to the tokenizer; the same seed gives bitwise the same weights."""
    from transformers import LlamaForCausalLM

    get_preset(preset)  # an unknown preset fails before the tokenizer is loaded
    check_output_path(out)  # and an unwritable --out before a 7B model is built
    tokenizer_dir = Path(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    # len() counts added tokens too; vocab_size alone would leave their ids without an embedding row.
    config = llama_config(preset, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # fork_rng: seeding must not leak into the caller's random state (tests, training loops).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)  # transformers 5 always writes safetensors
        copy_hf_tokenizer(tokenizer_dir, tmp)
        write_provenance(tmp, "model init", {"preset": preset, "tokenizer": tokenizer_dir, "seed": seed},
                         {"tokenizer": tokenizer_sha256(tokenizer_dir)},
                         parameters=params, vocab_size=config.vocab_size)
    return Path(out)

