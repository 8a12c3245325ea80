"""The one place that loads a tokenizer or a model folder and checks them.

Every stage goes through here, so the rules are the same everywhere:

- ``load_tokenizer`` / ``load_model``: a local HF folder (a GGUF file or a missing path is a one-line error, never a
  hub lookup traceback). Both SentencePiece folders (tokenizer.model, ours and Llama-2's) and byte-level BPE
  folders with tokenizer.json only (Llama-3 and most newer models) load.
- ``tokenizer_sha256``: the tokenizer's fingerprint, the sha256 of tokenizer.model when there is one (so data packed
  before BPE support still matches), else of tokenizer.json.
- ``embedding_rows`` / ``check_model_vocab``: whether a tokenizer fits a model's embedding matrix.
- ``load_checked``: model and tokenizer for inference and evaluation, on the right device and dtype, optionally
  quantised (zhllama.model.quantize) and with its RoPE context stretched (zhllama.model.rope).
"""

from __future__ import annotations

import json
from pathlib import Path

from zhllama.artifacts import file_sha256
from zhllama.errors import ZhllamaError
from zhllama.tokenizer.gguf_vocab import is_gguf
from zhllama.tokenizer.hf import HF_FILES

SPM_FILE, JSON_FILE, CONFIG_FILE = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_hf_folder(path: str | Path, what: str = "model") -> Path:
    """The path, if it is a folder; a GGUF file or a missing path is a one-line error saying what is expected."""
    path = Path(path)
    if path.is_file() and is_gguf(path):
        raise ZhllamaError(f"{path} is a GGUF file; this command takes an HF {what} folder (chat, generate, "
                           "serve and eval qa run a GGUF file: `zhllama serve --model FILE.gguf`)")
    if path.is_file():
        raise ZhllamaError(f"{path} is a file; this command takes an HF {what} folder")
    return path


def tokenizer_kind(folder: str | Path) -> str:
    """"spm" for a folder with tokenizer.model (the source of truth for our tokenizers), "bpe" for tokenizer.json
    only (byte-level BPE such as Llama-3's); a folder with neither is a one-line error."""
    folder = Path(folder)
    if (folder / SPM_FILE).is_file():
        return "spm"
    if (folder / JSON_FILE).is_file():
        return "bpe"
    raise ZhllamaError(f"{folder}: no {SPM_FILE} or {JSON_FILE}; pass a complete tokenizer folder")


def tokenizer_sha256(folder: str | Path) -> str:
    """The tokenizer's fingerprint: sha256 of tokenizer.model, else of tokenizer.json.

    tokenizer.model first: the SentencePiece fingerprints written before tokenizer.json folders were accepted (in
    packed data and provenance) must keep matching.
    """
    folder = Path(folder)
    return file_sha256(folder / (SPM_FILE if tokenizer_kind(folder) == "spm" else JSON_FILE))


def load_tokenizer(folder: str | Path, strict: bool = False):
    """AutoTokenizer from a local folder, with a one-line error instead of a hub lookup traceback.

    ``strict`` (data pack: the ids are written to disk) also refuses a tokenizer without BOS or EOS, and a bare
    tokenizer.model without tokenizer_config.json: it loads, but without Llama's "▁" prefix handling, so the ids
    would silently differ from the model's.
    """
    from transformers import AutoTokenizer  # imported here: transformers is slow to import

    folder = require_hf_folder(folder, "tokenizer")
    if not folder.is_dir():
        raise ZhllamaError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).exists() for name in HF_FILES):
        raise ZhllamaError(f"{folder} holds no tokenizer (none of {', '.join(HF_FILES)})")
    if strict and (folder / SPM_FILE).is_file() and not (folder / CONFIG_FILE).is_file():
        raise ZhllamaError(f"{folder}: no {CONFIG_FILE}; pass a complete tokenizer folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    # The tokenizers library reports a malformed tokenizer.json (bad JSON, a merge of an unknown token) as a bare
    # Exception: still bad input, not a bug to show as a traceback.
    except Exception as exc:  # noqa: BLE001
        raise ZhllamaError(f"{folder}: cannot load the tokenizer ({first_line(exc)})") from None
    if strict and (tok.bos_token_id is None or tok.eos_token_id is None):
        raise ZhllamaError(f"{folder}: the tokenizer has no BOS or EOS token")
    return tok


def load_model(model_dir: str | Path, **kwargs):
    """AutoModelForCausalLM from a local HF folder, in the checkpoint's dtype unless ``dtype`` says otherwise."""
    from transformers import AutoModelForCausalLM

    model_dir = require_hf_folder(model_dir)
    if not model_dir.is_dir():
        raise ZhllamaError(f"model folder {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ZhllamaError(f"{model_dir} has no config.json; not a Hugging Face model folder")
    try:
        # "auto" keeps the checkpoint's dtype: a bf16 7B model must not double in memory.
        kwargs.setdefault("dtype", "auto")
        return AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ZhllamaError(f"{model_dir}: cannot load the model ({first_line(exc)})") from None


def load_model_config(model_dir: str | Path):
    """AutoConfig from a local folder (no weights read), with a one-line error naming the folder."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ZhllamaError(f"{model_dir}: cannot read config.json ({first_line(exc)})") from None


def embedding_rows(model_dir: str | Path) -> int | None:
    """The model's embedding rows as config.json states them (None where it does not), without loading weights."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ZhllamaError(f"{path}: cannot read the model config ({first_line(exc)})") from None
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")


def check_model_vocab(model_dir: str | Path, tokenizer) -> None:
    """A tokenizer with more pieces than the model has embedding rows is the wrong tokenizer for it.

    Fewer is fine: checkpoints often pad the embedding matrix to a multiple of 64 or 128.
    """
    rows = embedding_rows(model_dir)
    if rows is not None and len(tokenizer) > rows:
        raise ZhllamaError(f"the tokenizer in {model_dir} has {len(tokenizer):,} pieces but the model has {rows:,} "
                           "embedding rows; it is not this model's tokenizer (after a vocabulary extension, run "
                           "`zhllama model extend-vocab` first)")


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
