"""Loading a model with its tokenizer for inference and evaluation, on the right device and dtype."""

from __future__ import annotations

from pathlib import Path


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_checked(model_dir: str | Path, device: str = "auto"):
    """(model in eval mode on ``device``, tokenizer), the tokenizer checked against the model's embedding rows.

    On a GPU with bf16 the model is loaded in bf16; log-likelihoods are computed in fp32 by the callers.
    """
    import torch

    from zhllama.model.extend_vocab import load_model
    from zhllama.model.init import load_tokenizer
    from zhllama.train.sft import check_model_vocab

    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    check_model_vocab(model_dir, tokenizer)
    device = pick_device(device)
    kwargs = {"dtype": torch.bfloat16} if device == "cuda" and torch.cuda.is_bf16_supported() else {}
    model = load_model(model_dir, attn_implementation="sdpa", **kwargs).to(device).eval()
    return model, tokenizer
