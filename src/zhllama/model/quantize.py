"""Quantised loading of HF models (``--quantize int8|int4``).

On a CUDA GPU both kinds are bitsandbytes, applied while the weights load (the full-precision model never has
to fit): LLM.int8() for int8, 4-bit NF4 with bf16 compute for int4. transformers leaves ``lm_head`` unquantised.

On CPU, int8 is torch's dynamic quantisation: nn.Linear weights stored as int8 with a per-tensor scale, the
activations quantised on the fly at each call. ``lm_head`` stays fp32 there as well, for two measured reasons on
the tiny model: quantising it lowers greedy top-1 agreement with fp32 the most (one matrix decides every token),
and it is the one Linear whose input is always a single vector per token, where int8 saves little time. int4 has no
CPU kernel in torch or bitsandbytes, so it is refused with the way that does work (a q4_0 GGUF).

``torch.ao.quantization.quantize_dynamic`` is deprecated in favour of torchao, but it is still in torch 2.13 and
needs no extra package; its deprecation warnings are silenced because the user can do nothing about them.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from zhllama.errors import ZhllamaError

KINDS = ("int8", "int4")
# Kept in full precision by quantize_model, as transformers does for bitsandbytes.
SKIP_MODULES = ("lm_head",)


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def check_kind(kind: str | None, device: str) -> None:
    """Raise for a kind that is unknown or cannot run on ``device``; before minutes of loading, not after."""
    if kind is None:
        return
    if kind not in KINDS:
        raise ZhllamaError(f"--quantize must be one of {', '.join(KINDS)}, got {kind!r}")
    if is_cuda(device):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ZhllamaError(f"--quantize {kind} on a GPU needs the bitsandbytes package: pip install bitsandbytes")
        return
    if str(device) != "cpu":
        raise ZhllamaError(f"--quantize works on cuda (bitsandbytes) or cpu (int8 only), not on {device}")
    if kind == "int4":
        raise ZhllamaError("int4 needs a CUDA GPU (bitsandbytes); on CPU use --quantize int8 or a q4_0 GGUF via "
                           "`zhllama export gguf`")


def bnb_config(kind: str):
    """The bitsandbytes settings for ``kind``: LLM.int8(), or NF4 with double quantisation and bf16 compute."""
    from transformers import BitsAndBytesConfig

    if kind not in KINDS:  # the settings alone need no bitsandbytes; check_kind checks the package for loading
        raise ZhllamaError(f"--quantize must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # Double quantisation stores the per-64 absmax scales in 8 bits: ~0.37 GB less on a 7B model, same quality.
    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_kwargs(kind: str | None, device: str) -> dict:
    """Extra ``from_pretrained`` arguments for loading quantised on ``device`` (checked first)."""
    check_kind(kind, device)
    if kind is None:
        return {}
    if is_cuda(device):
        index = torch.device(device).index or 0
        # bitsandbytes places the weights itself; a quantised model cannot be moved with .to() afterwards.
        return {"quantization_config": bnb_config(kind), "device_map": {"": index}}
    # Dynamic quantisation needs float32 weights: a bf16 checkpoint would otherwise stay bf16 ("auto" dtype).
    return {"dtype": torch.float32}


def quantize_model(model, kind: str | None, device: str):
    """``model`` quantised for ``device`` after loading: CPU int8 dynamic quantisation of every nn.Linear but
    ``lm_head``. On a GPU bitsandbytes did the work at load time (see ``load_kwargs``), so the model comes back
    as it is."""
    check_kind(kind, device)
    if kind is None or is_cuda(device):
        return model
    if model.dtype != torch.float32:
        model = model.float()
    names = {name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in SKIP_MODULES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices, see the module docstring
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)


def quantized_linear_count(model) -> int:
    """How many Linear layers of ``model`` hold int8 weights (CPU dynamic or bitsandbytes); for checks and logs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    count = 0
    for module in model.modules():
        if isinstance(module, DynamicLinear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            count += 1
    return count
