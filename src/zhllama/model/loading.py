"""Loading a model with its tokenizer for inference and evaluation, on the right device and dtype, optionally
quantised (zhllama.model.quantize) and with its RoPE context stretched (zhllama.model.rope)."""

from __future__ import annotations

import json
from pathlib import Path

from zhllama.errors import ZhllamaError


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_checked(model_dir: str | Path, device: str = "auto", quantize: str | None = None, rope: str | None = None,
                 rope_factor: float | None = None):
    """(model in eval mode on ``device``, tokenizer), the tokenizer checked against the model's embedding rows.

    On a GPU with bf16 the model is loaded in bf16; log-likelihoods are computed in fp32 by the callers.
    ``quantize`` (None | int8 | int4) and ``rope``/``rope_factor`` are checked before any weight is read.
    """
    import torch

    from zhllama.model.extend_vocab import load_model
    from zhllama.model.init import load_tokenizer
    from zhllama.model.quantize import load_kwargs, quantize_model
    from zhllama.model.rope import scaled_config

    model_dir = Path(model_dir)
    device = pick_device(device)
    kwargs = load_kwargs(quantize, device)  # raises for an unknown kind or one the device cannot run
    tokenizer = load_tokenizer(model_dir)
    check_model_vocab(model_dir, tokenizer)
    if (config := scaled_config(model_dir, rope, rope_factor)) is not None:
        kwargs["config"] = config
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        kwargs.setdefault("dtype", torch.bfloat16)
    model = load_model(model_dir, attn_implementation="sdpa", **kwargs)
    if "device_map" not in kwargs:  # bitsandbytes already placed (and fixed) the weights
        model = model.to(device)
    return quantize_model(model, quantize, device).eval(), tokenizer


def check_model_vocab(model_dir: Path, tokenizer) -> None:
    """A tokenizer with more pieces than the model has embedding rows is the wrong tokenizer for it."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if rows is not None and len(tokenizer) > rows:
        raise ZhllamaError(f"the tokenizer in {model_dir} has {len(tokenizer):,} pieces but the model has {rows:,} "
                           "embedding rows; it is not this model's tokenizer (after a vocabulary extension, run "
                           "`zhllama model extend-vocab` first)")
