"""A freshly initialised Llama model with a given tokenizer, saved as a complete Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch

from zhllama.artifacts import atomic_output_dir, check_output_path, file_sha256, write_provenance
from zhllama.errors import ZhllamaError
from zhllama.model.presets import get_preset, llama_config
from zhllama.tokenizer.hf import HF_FILES, copy_hf_tokenizer

GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    """Whether the file starts with GGUF's magic bytes (whatever its name)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def require_hf_folder(path: str | Path, what: str = "model") -> Path:
    """The path, if it is a folder; a GGUF file or a missing path is a one-line error saying what is expected."""
    path = Path(path)
    if path.is_file() and is_gguf(path):
        raise ZhllamaError(f"{path} is a GGUF file; this command takes an HF {what} folder (chat, generate, "
                           "serve and eval qa run a GGUF file: `zhllama serve --model FILE.gguf`)")
    if path.is_file():
        raise ZhllamaError(f"{path} is a file; this command takes an HF {what} folder")
    return path


def load_tokenizer(folder: str | Path):
    """AutoTokenizer from a local folder, with a one-line error instead of a hub lookup traceback."""
    from transformers import AutoTokenizer

    folder = require_hf_folder(folder, "tokenizer")
    if not folder.is_dir():
        raise ZhllamaError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).exists() for name in HF_FILES):
        raise ZhllamaError(f"{folder} holds no tokenizer (none of {', '.join(HF_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ZhllamaError(f"{folder}: cannot load the tokenizer ({first_line(exc)})") from None


def tokenizer_sha256(folder: Path) -> str:
    # tokenizer.model is the source of truth for our tokenizers; tokenizer.json for anyone else's.
    for name in ("tokenizer.model", "tokenizer.json"):
        if (folder / name).is_file():
            return file_sha256(folder / name)
    return ""


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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
