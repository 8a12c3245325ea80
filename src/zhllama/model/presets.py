"""Model shapes: two small ones that train on a CPU, and the public Llama shapes worth continuing from.

Every hidden and intermediate width is a multiple of 256, because GGUF K-quants work in blocks of 256 along
the last dimension; any other width silently falls back to a bigger, slower quant type at export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # Llama-3.2-1B shares its input and output matrices; Llama-2 and Llama-3-8B do not.
    tie_word_embeddings: bool = False
    # Extra RoPE parameters (transformers 5 ``rope_parameters``, with "rope_type"); None is plain RoPE.
    rope_scaling: dict | None = field(default=None, hash=False)
    # The vocabulary the published model has, for sizing the shape alone (zhllama model memory); None: Llama-2's.
    vocab_size: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


LLAMA3_VOCAB = 128_256


def _llama3_rope(factor: float) -> dict:
    """Llama 3.1's published RoPE scaling: wavelengths beyond the 8k training context divided by ``factor``."""
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


PRESETS: dict[str, Preset] = {
    # Trains in seconds on a laptop CPU: the tests and the demo use it.
    "tiny": Preset(256, 768, 4, 4, 4, 2048),
    # Big enough to write readable Chinese after a few hours on a CPU.
    "small": Preset(512, 1536, 8, 8, 8, 2048),
    # TinyLlama-1.1B: grouped-query attention with 4 KV heads.
    "1b": Preset(2048, 5632, 22, 32, 4, 2048),
    # Llama-2-7B.
    "7b": Preset(4096, 11008, 32, 32, 32, 4096),
    # Llama-3.2-1B: 128k context through Llama 3.1's RoPE scaling of an 8k-trained base (zhllama.model.rope).
    "llama3-1b": Preset(2048, 8192, 16, 32, 8, 131_072, 500_000.0, tie_word_embeddings=True,
                        rope_scaling=_llama3_rope(32.0), vocab_size=LLAMA3_VOCAB),
    # Llama-3.1-8B (and Llama-3-8B's shape).
    "llama3-8b": Preset(4096, 14336, 32, 32, 8, 131_072, 500_000.0,
                        rope_scaling=_llama3_rope(8.0), vocab_size=LLAMA3_VOCAB),
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
        rope_parameters={"rope_type": "default", **(preset.rope_scaling or {}), "rope_theta": preset.rope_theta},
        rms_norm_eps=RMS_NORM_EPS,
        initializer_range=INITIALIZER_RANGE,
        hidden_act="silu",
        # Untied except where the published shape ties (Llama-3.2-1B): extending the vocabulary then
        # initialises input and output rows separately.
        tie_word_embeddings=preset.tie_word_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
