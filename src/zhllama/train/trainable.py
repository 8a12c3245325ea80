"""Which weights train: all of them, only the embeddings and lm_head (all rows, or only the rows a vocabulary
extension added), or LoRA adapters plus those."""

from __future__ import annotations

import torch

from zhllama.config import TrainConfig
from zhllama.errors import ZhllamaError

MODES = ("all", "embeddings", "new-rows", "lora", "qlora")
EMBEDDING_MODULES = ["embed_tokens", "lm_head"]


def prepare_trainable(model: torch.nn.Module, cfg: TrainConfig, base_rows: int | None = None) -> torch.nn.Module:
    """``base_rows``: for ``new-rows``, the vocabulary size before the extension (rows below it stay as they are)."""
    if cfg.trainable == "all":
        model.requires_grad_(True)
        return model
    if cfg.trainable in ("embeddings", "new-rows"):
        # The usual first stage after a vocabulary extension: the body stays as it was.
        model.requires_grad_(False)
        model.get_input_embeddings().requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
        if cfg.trainable == "new-rows":
            _freeze_base_rows(model, base_rows)
        return model
    if cfg.trainable in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.trainable == "qlora":
            if not getattr(model, "is_loaded_in_4bit", False):
                # LoRA on a full-precision base under the name QLoRA would be a silent fp32 run.
                raise ZhllamaError("trainable qlora needs the base model loaded in 4-bit NF4 "
                                   "(load_for_training(nf4=True)); use lora for a full-precision base")
            # Norms to fp32 and inputs that require grad, so that gradients reach the adapters of a 4-bit base.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

        settings = cfg.lora
        lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=list(settings.target_modules), task_type="CAUSAL_LM",
                          modules_to_save=EMBEDDING_MODULES if settings.train_embeddings else None)
        return get_peft_model(model, lora)
    raise ZhllamaError(f"unknown trainable mode {cfg.trainable!r}; choose one of {', '.join(MODES)}")


def _freeze_base_rows(model: torch.nn.Module, base_rows: int | None) -> None:
    """Zero the gradient of every base row. With no gradient and no weight decay (parameter_groups), AdamW's
    moments of those rows stay 0 and so does their update: the base rows end bitwise as they began."""
    rows = model.get_input_embeddings().weight.shape[0]
    if base_rows is None or not 0 < base_rows < rows:
        raise ZhllamaError(f"trainable new-rows needs a model written by `zhllama model extend-vocab`, whose "
                           f"zhllama.json gives the base vocabulary size below its {rows:,} rows (got {base_rows})")

    def keep_base(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:base_rows] = 0
        return grad

    for weight in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                   }.values():  # once for tied embeddings
        weight.register_hook(keep_base)


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Decay matrices; leave norms and biases alone, and with ``new-rows`` the embeddings (decay would move the
    base rows, which must not)."""
    weight_decay = cfg.weight_decay
    spared = tuple(EMBEDDING_MODULES) if cfg.trainable == "new-rows" else ()
    decay, no_decay = [], []
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.requires_grad:
            skip = param.ndim < 2 or any(f".{module}." in f".{name}." for module in spared)
            (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: everything that trains, plus nothing that cannot change."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def merged_for_export(model: torch.nn.Module) -> torch.nn.Module:
    """A plain LlamaForCausalLM: LoRA folded into the base weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def check_qlora_available() -> None:
    """QLoRA's NF4 kernels exist only for CUDA; say so before anything is loaded."""
    if not torch.cuda.is_available():
        raise ZhllamaError("QLoRA needs a CUDA GPU: bitsandbytes' 4-bit NF4 kernels do not run on CPU; "
                           "use --lora (LoRA on the full-precision base) here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ZhllamaError("QLoRA needs the bitsandbytes package: pip install bitsandbytes") from None


def nf4_quantization_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
