"""Which engine runs a model: the one place that chooses, for `chat`, `generate`, `serve` and `eval qa`.

With ``backend="auto"`` the path decides: a folder is an HF model (``infer.hf``, continuous batching); a file that
starts with GGUF's magic bytes, whatever its name, runs on llama.cpp (``infer.llamacpp``); anything else is a
one-line error naming the path and what was expected. ``"hf"`` and ``"llamacpp"`` force a backend, and each then
refuses the other's inputs in its own words.

A GGUF file carries its own quantisation and RoPE settings, so ``quantize``, ``rope`` and ``rope_factor`` are
refused for one. It runs on the CPU: ``device`` ``"auto"`` and ``"cpu"`` are accepted, and anything else (``cuda``)
is refused rather than silently ignored, since a user who asked for the GPU would otherwise get the CPU.

llama-cpp-python is optional: it is imported only when a GGUF file is loaded.
"""

from __future__ import annotations

from pathlib import Path

from zhllama.errors import ZhllamaError
from zhllama.infer.engine import Engine
from zhllama.tokenizer.gguf_vocab import is_gguf

BACKENDS = ("auto", "hf", "llamacpp")
EXPECTED = "an HF model folder or a GGUF file (`zhllama export gguf` makes one)"
GGUF_DEVICES = ("auto", "cpu")


def detect_backend(path: str | Path) -> str:
    """``"hf"`` for a folder, ``"llamacpp"`` for a GGUF file (by its magic bytes); otherwise a one-line error."""
    path = Path(path)
    if path.is_dir():
        return "hf"
    if path.is_file():
        if is_gguf(path):
            return "llamacpp"
        if path.suffix.lower() == ".gguf":
            raise ZhllamaError(f"{path} is named .gguf but is not a GGUF file (it does not start with the GGUF "
                               f"magic bytes); expected {EXPECTED}")
        raise ZhllamaError(f"{path} is neither an HF model folder nor a GGUF file; expected {EXPECTED}")
    raise ZhllamaError(f"{path} does not exist; expected {EXPECTED}")


def load_engine(path: str | Path, template: str | None = None, backend: str = "auto", device: str = "auto",
                name: str | None = None, max_tokens_limit: int = 4096, max_concurrency: int = 16,
                quantize: str | None = None, rope: str | None = None, rope_factor: float | None = None) -> Engine:
    """The engine for ``path``: HF for a model folder, llama.cpp for a GGUF file (``backend="auto"``), or the
    backend named. ``max_concurrency`` applies to HF only (llama.cpp answers one request at a time)."""
    if backend not in BACKENDS:
        raise ZhllamaError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = detect_backend(path)
    if backend == "llamacpp":
        if quantize or rope or rope_factor is not None:
            raise ZhllamaError("--quantize and --rope apply to HF models; a GGUF file carries its own "
                               "quantisation and RoPE settings (set them at `zhllama export gguf`)")
        if device not in GGUF_DEVICES:
            raise ZhllamaError(f"--device {device}: a GGUF file runs on the CPU through llama.cpp; leave --device "
                               "auto (or cpu), or give the HF model folder to run on the GPU")
        from zhllama.infer.llamacpp import load_llamacpp_engine  # llama_cpp itself is imported only in there

        return load_llamacpp_engine(path, template, name=name, max_tokens_limit=max_tokens_limit)
    if Path(path).is_file() and is_gguf(path):
        raise ZhllamaError(f"{path} is a GGUF file; --backend hf takes an HF model folder (leave --backend auto, or "
                           "give --backend llamacpp, to run it)")
    from zhllama.infer.hf import load_hf_engine

    return load_hf_engine(path, template, device=device, name=name, max_tokens_limit=max_tokens_limit,
                          max_concurrency=max_concurrency, quantize=quantize, rope=rope, rope_factor=rope_factor)
