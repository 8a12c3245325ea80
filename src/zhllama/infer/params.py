"""What a caller asks of a generation, and what comes back.

``SamplingParams.check`` is the one place the ranges are enforced, so the terminal chat, the HTTP server and the
Python API refuse the same things with the same words. ``BadRequest`` names the offending field, which the server
puts into OpenAI's ``error.param``.
"""

from __future__ import annotations

from dataclasses import dataclass

from zhllama.errors import ZhllamaError

MAX_STOP_STRINGS = 4  # OpenAI's limit; more would only slow the hold-back search
# The engines hold top_k in a 32-bit integer (transformers' batch in an int32 tensor, llama.cpp in a C int): a
# larger value failed inside the batch and stopped it for everyone. Any value at least the vocabulary means no cut.
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits; llama.cpp reduces the seed modulo 2^32 - 1
# Below this a temperature is greedy (vLLM's rule too): the batch holds temperatures as float32, where 1e-50 is 0
# and 1e-40 divides the logits into infinities, which sampled garbage in the batch and failed a seeded request.
GREEDY_BELOW = 1e-5
# The smallest repetition penalty: HF divides positive logits by it, and 1e-300 made them infinite (a failed
# request). 0.01 already scales them a hundredfold.
MIN_REPETITION_PENALTY = 0.01


class BadRequest(ZhllamaError):
    """A request the engine refuses; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.7  # 0 (anything below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def needs_exclusive_lane(self) -> bool:
        """Seeded and repetition-penalised requests cannot share a batch's sampler (see ``infer.hf``)."""
        return self.seed is not None or self.repetition_penalty != 1.0

    def check(self, max_tokens_limit: int | None = None) -> SamplingParams:
        _int("max_tokens", self.max_tokens, 1, max_tokens_limit)
        _number("temperature", self.temperature, 0.0, 2.0)
        _int("top_k", self.top_k, 0, MAX_TOP_K)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _number("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, 10.0)
        if self.seed is not None:
            _int("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise BadRequest("stop must be a list of non-empty strings", "stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}", "stop")
        return self


def _int(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {show_value(value)}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{name} must be {bound}, got {show_value(value)}", name)


def _number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise BadRequest(f"{name} must be a number, got {show_value(value)}", name)
    if value < low or value > high or (low_open and value == low):
        left = "(" if low_open else "["
        raise BadRequest(f"{name} must be in {left}{low:g}, {high:g}], got {show_value(value)}", name)


def show_value(value) -> str:
    """The value for a message, cut short (a 400-digit integer is valid JSON, and no float: ``:g`` would raise)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Delta:
    """One streamed step: new text (possibly empty) and, on the last step, why generation ended."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop", "length", or "error" (with message) on the last delta
    error: str | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
