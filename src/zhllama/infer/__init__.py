"""Generation: one ``Engine`` interface, its HF and llama.cpp backends, sampling parameters and the prompt rule.

``load_engine`` chooses the backend for a path (``infer.load``); llama-cpp-python is imported only for a GGUF file.
"""

from zhllama.infer.engine import Engine
from zhllama.infer.hf import HFEngine, load_hf_engine
from zhllama.infer.load import BACKENDS, detect_backend, load_engine
from zhllama.infer.params import BadRequest, Completion, Delta, SamplingParams
from zhllama.infer.prompt import PromptBuilder, prompt_builder

__all__ = ["BACKENDS", "BadRequest", "Completion", "Delta", "Engine", "HFEngine", "PromptBuilder", "SamplingParams",
           "detect_backend", "load_engine", "load_hf_engine", "prompt_builder"]
