"""Model stage: initialise a Llama model for a tokenizer, and grow a model to an extended tokenizer.

Every function that writes returns the path of a complete Hugging Face folder (weights, config, tokenizer,
zhllama.json), written whole or not at all.
"""

from zhllama.model.extend_vocab import INIT_METHODS, extend_vocab, initial_loss, text_nll
from zhllama.model.init import init_model
from zhllama.model.meta import convert_meta
from zhllama.model.presets import PRESETS, Preset, llama_config

__all__ = [
           "INIT_METHODS",
           "PRESETS",
           "Preset",
           "extend_vocab",
           "convert_meta",
           "init_model",
           "initial_loss",
           "llama_config",
           "text_nll",
]
