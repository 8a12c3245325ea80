"""Generation: one ``Engine`` interface, the HF backend, sampling parameters and the prompt rule."""

from zhllama.infer.engine import Engine
from zhllama.infer.hf import HFEngine, load_engine
from zhllama.infer.params import BadRequest, Completion, Delta, SamplingParams
from zhllama.infer.prompt import PromptBuilder, prompt_builder

__all__ = ["BadRequest", "Completion", "Delta", "Engine", "HFEngine", "PromptBuilder", "SamplingParams",
           "load_engine", "prompt_builder"]
