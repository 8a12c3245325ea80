"""Typed recipe configs: dataclasses loaded from YAML in recipes/ and overridden by command-line flags."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zhllama.errors import ZhllamaError


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # After a vocabulary extension the new rows must learn too, so they train in full beside the adapter.
    train_embeddings: bool = True


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 8  # sequences per process per micro-step
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seq_len: int | None = None  # None: the packed data's seq-len
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 50
    eval_batches: int = 16
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32; auto = bf16 where it is faster (GPU, CPUs with AVX512-BF16)
    # all | embeddings (embed_tokens + lm_head) | lora (LoRA adapters, see lora.train_embeddings) | qlora (LoRA on
    # a 4-bit NF4 base; needs a CUDA GPU and bitsandbytes)
    trainable: str = "all"
    # Restart positions at each document start inside a block; attention then stays inside each document (the
    # span attention of train/varlen.py) and no document learns to predict the next one's first token.
    # None: follow the data, on when it was packed with --doc-boundaries; true or false overrides it.
    reset_position_ids: bool | None = None
    # RoPE scaling applied to the model before training (linear | dynamic | yarn | llama3, with a factor > 1), so
    # the context it is trained at, and the saved config, carry the stretched positions.
    rope: str | None = None
    rope_factor: float | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class SftConfig(TrainConfig):
    """Supervised fine-tuning: the pretraining settings plus what turns conversations into batches."""

    template: str | None = None  # atom | llama2 | chatml (required, from the recipe or --template)
    seq_len: int | None = 1024  # longer conversations lose their oldest turns
    packing: bool = True  # several conversations per row, attention kept inside each
    train_on_prompt: bool = False  # loss on every token instead of only the assistant replies
    val_fraction: float = 0.02  # conversations held out for the validation loss
    lr: float = 2e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50


def _coerce(kind, value, name: str):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        return None if value is None else _coerce(options[0], value, name)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ZhllamaError(f"config field {name!r} must be a mapping")
        return from_dict(kind, value, prefix=f"{name}.")
    if origin is list:
        if not isinstance(value, list):
            raise ZhllamaError(f"config field {name!r} must be a list")
        return list(value)
    if kind is bool and not isinstance(value, bool):
        raise ZhllamaError(f"config field {name!r} must be true or false, not {value!r}")
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ZhllamaError(f"config field {name!r} must be a number, not {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ZhllamaError(f"config field {name!r} must be a whole number, not {value!r}")
    return kind(value)


def from_dict(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ZhllamaError(f"unknown config field {prefix}{unknown[0]!r}; known: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in values.items()})


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None):
    """Defaults, then the YAML recipe, then flags that were given (None means not given)."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ZhllamaError(f"{path}: no such recipe")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ZhllamaError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ZhllamaError(f"{path}: a recipe must be a mapping of field: value")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, values)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
