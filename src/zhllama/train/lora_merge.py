"""Merge LoRA adapters into their base model, refusing adapters made for another base or vocabulary.

The most common failure users of Chinese Llama adapters report is an adapter trained after a vocabulary
extension being applied to the original model (or the other way round); peft then fails deep inside
load_state_dict with a shape error. We read the adapter's own tensors first and say which sizes disagree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open

from zhllama.artifacts import atomic_output_dir, file_sha256, write_provenance
from zhllama.errors import ZhllamaError
from zhllama.tokenizer.hf import copy_hf_tokenizer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
GENERATION_CONFIG = "generation_config.json"


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    path = adapter_dir / ADAPTER_WEIGHTS
    if not (adapter_dir / "adapter_config.json").is_file() or not path.is_file():
        raise ZhllamaError(f"{adapter_dir} is not a LoRA adapter folder (needs adapter_config.json and "
                           f"{ADAPTER_WEIGHTS})")
    with safe_open(str(path), framework="pt") as fh:
        return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118 (not iterable)


def adapter_vocab_size(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Rows of the embedding or lm_head the adapter carries (fully trained copies or LoRA factors)."""
    for key, shape in shapes.items():
        if "embed_tokens" in key:
            if "lora_embedding_A" in key:
                return shape[1]
            if "lora_" not in key:
                return shape[0]
        if "lm_head" in key and ("lora_B" in key or "lora_" not in key):
            return shape[0]
    return None


def check_adapter(adapter_dir: Path, base_rows: int) -> None:
    rows = adapter_vocab_size(adapter_shapes(adapter_dir))
    if rows is not None and rows != base_rows:
        raise ZhllamaError(
            f"adapter {adapter_dir} was trained for a vocabulary of {rows} tokens but the base model has "
            f"{base_rows} embedding rows; merge it into the base it was trained on (after "
            f"`zhllama model extend-vocab` if it was trained on an extended vocabulary)")


def carry_run_files(base_dir: Path, adapters: list[Path], out: Path) -> None:
    """The tokenizer (with its chat template and special tokens) and generation config of the last adapter that
    carries them, else the base's: an SFT adapter was trained with a template the base does not know, and serving
    the merged model with another template would break the one-template rule."""
    with_tokenizer = [a for a in adapters if (a / "tokenizer_config.json").is_file()]
    copy_hf_tokenizer(with_tokenizer[-1] if with_tokenizer else base_dir, out)
    with_generation = [a for a in adapters if (a / GENERATION_CONFIG).is_file()]
    if with_generation:
        shutil.copy2(with_generation[-1] / GENERATION_CONFIG, out / GENERATION_CONFIG)


def merge_adapters(base_dir: str | Path, adapters: list[str | Path], out: str | Path) -> Path:
    """Apply each adapter in turn and fold it into the weights; write a standalone HF folder."""
    from peft import PeftModel

    from zhllama.model.loading import load_model

    base_dir, out = Path(base_dir), Path(out)
    if not adapters:
        raise ZhllamaError("give at least one --adapter")
    config = base_dir / "config.json"
    if not config.is_file():
        raise ZhllamaError(f"{base_dir} has no config.json; not a Hugging Face model folder")
    rows = json.loads(config.read_text())["vocab_size"]
    for adapter in map(Path, adapters):  # all checked before any weights are loaded
        check_adapter(adapter, rows)
    model = load_model(base_dir)
    for adapter in map(Path, adapters):
        try:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except (RuntimeError, ValueError) as exc:  # shape mismatches: an adapter for another base model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ZhllamaError(f"adapter {adapter} does not fit base {base_dir}: {first}") from None
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        carry_run_files(base_dir, [Path(a) for a in adapters], tmp)
        write_provenance(tmp, "lora merge", {"base": base_dir, "adapter": [str(a) for a in adapters]},
                         {str(a): file_sha256(Path(a) / ADAPTER_WEIGHTS) for a in adapters},
                         adapter_configs=[json.loads((Path(a) / "adapter_config.json").read_text())
                                          for a in adapters])
    return out
