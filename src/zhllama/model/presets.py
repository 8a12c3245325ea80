"""Model shapes: two small ones that train on a CPU, and the two public Llama shapes worth continuing from.

Every hidden and intermediate width is a multiple of 256, because GGUF K-quants work in blocks of 256 along
the last dimension; any other width silently falls back to a bigger, slower quant type at export.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from zhllama.errors import ZhllamaError


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, Preset] = {
    # Trains in seconds on a laptop CPU: the tests and the demo use it.
    "tiny": Preset(256, 768, 4, 4, 4, 2048),
    # Big enough to write readable Chinese after a few hours on a CPU.
    "small": Preset(512, 1536, 8, 8, 8, 2048),
    # TinyLlama-1.1B: grouped-query attention with 4 KV heads.
    "1b": Preset(2048, 5632, 22, 32, 4, 2048),
    # Llama-2-7B.
    "7b": Preset(4096, 11008, 32, 32, 32, 4096),
}

# Llama-2 uses 1e-5; one value for every preset keeps tiny checkpoints interchangeable with the big ones.
RMS_NORM_EPS = 1e-5
INITIALIZER_RANGE = 0.02


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ZhllamaError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def llama_config(preset_name: str, vocab_size: int, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None) -> LlamaConfig:
    """A LlamaConfig for `preset_name` with the tokenizer's vocabulary size and special ids."""
    preset = get_preset(preset_name)
    if vocab_size <= 0:
        raise ZhllamaError(f"vocabulary size must be positive, got {vocab_size}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        # transformers 5 keeps RoPE settings here; config.rope_theta no longer exists.
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        rms_norm_eps=RMS_NORM_EPS,
        initializer_range=INITIALIZER_RANGE,
        hidden_act="silu",
        # Untied, as in Llama-2: extending the vocabulary then initialises input and output rows separately.
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
