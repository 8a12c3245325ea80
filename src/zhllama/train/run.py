"""What every training run shares: the model loaded for training, the run folder checked, final/ written."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from zhllama.artifacts import PROVENANCE, atomic_output_dir, check_output_path, read_provenance, write_provenance
from zhllama.errors import ZhllamaError
from zhllama.runs import list_checkpoints
from zhllama.tokenizer.hf import copy_hf_tokenizer, set_chat_template
from zhllama.train.lora_merge import GENERATION_CONFIG
from zhllama.train.trainable import check_qlora_available, merged_for_export


def load_for_training(model_dir: Path, seq_len: int | None = None, nf4: bool = False, rope: str | None = None,
                      rope_factor: float | None = None):
    """The model in fp32 (mixed precision autocasts from there), or with a frozen 4-bit NF4 base for QLoRA.

    ``rope``/``rope_factor`` scale RoPE in the config before the weights load (zhllama.model.rope): the longer
    ``seq_len`` is then allowed, and the saved model keeps the scaling in its config.json.
    """
    from zhllama.model.loading import load_model  # one place that turns load failures into errors
    from zhllama.model.rope import scaled_config

    config = scaled_config(model_dir, rope, rope_factor)
    kwargs = {} if config is None else {"config": config}
    if nf4:
        from zhllama.train.trainable import nf4_quantization_config

        check_qlora_available()
        model = load_model(model_dir, quantization_config=nf4_quantization_config(), device_map={"": 0}, **kwargs)
    else:
        model = load_model(model_dir, **kwargs)
        model = model.float() if model.dtype != torch.float32 else model
    # SDPA, but a packed row's conversations (or documents) attend one span at a time: see train/varlen.py.
    from zhllama.train.varlen import register

    model.config._attn_implementation = register()
    limit = model.config.max_position_embeddings
    if seq_len is not None and seq_len > limit:
        raise ZhllamaError(f"--seq-len {seq_len} is larger than the model supports ({limit} positions)")
    return model


def base_vocab_size(model_dir: Path) -> int | None:
    """The vocabulary size before the extension that made ``model_dir`` (its zhllama.json, from `model
    extend-vocab`): where ``--trainable new-rows`` starts."""
    return read_provenance(model_dir).get("base_vocab_size")


RUN_REPORTS = ("sft_data.json", "dpo_data.json", "reference_logps.safetensors")


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse an --out that cannot be written, is someone else's folder, or holds checkpoints without --resume."""
    check_output_path(out)  # an unwritable --out fails now, not after the data is read
    # Under torchrun another rank of this very run may already have written its data report (sft_data.json) when
    # this one looks: those files alone do not make the folder someone else's.
    others = [p for p in out.iterdir() if not any(r in p.name for r in RUN_REPORTS)] if out.is_dir() else []
    if others and not (out / PROVENANCE).exists():
        raise ZhllamaError(f"{out} exists and is not a zhllama run; choose another --out")
    if not resume and list_checkpoints(out):
        raise ZhllamaError(f"{out} already holds checkpoints; pass --resume to continue it, or choose another --out")


def finish_run(model, run_dir: Path, model_dir: Path, command: str, args: dict, inputs: dict,
               chat_template: str | None = None, state_dict: dict | None = None) -> Path:
    """Write final/: a plain HF folder (LoRA merged) with the model's tokenizer (and the chat template SFT used);
    LoRA runs also keep adapter/, for `zhllama lora merge` onto another copy of the base. Each is written whole or
    not at all, with its zhllama.json. ``state_dict``: the whole weights, gathered, where the engine sharded them
    (``model`` then holds one rank's part)."""
    final = run_dir / "final"
    adapter = run_dir / "adapter" if hasattr(model, "peft_config") else None
    if adapter is not None and adapter.is_dir() and not (adapter / PROVENANCE).exists():
        shutil.rmtree(adapter)  # an earlier zhllama's, in this run folder (check_run_dir), from before it had one
    with ExitStack() as stack:
        adapter_tmp = stack.enter_context(atomic_output_dir(adapter)) if adapter is not None else None
        if adapter_tmp is not None:
            model.save_pretrained(str(adapter_tmp))  # before merged_for_export folds the adapter into the base
        with atomic_output_dir(final) as tmp:
            merged_for_export(model).save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            copy_hf_tokenizer(model_dir, tmp)
            if chat_template is not None:
                set_chat_template(tmp, chat_template)
            write_provenance(tmp, command, args, inputs)
        if adapter_tmp is not None:
            # `lora merge` takes the template, special tokens and generation settings from the adapter folder.
            copy_hf_tokenizer(final, adapter_tmp)
            if (final / GENERATION_CONFIG).is_file():
                shutil.copy2(final / GENERATION_CONFIG, adapter_tmp / GENERATION_CONFIG)
            write_provenance(adapter_tmp, command, args, inputs)
    return final
