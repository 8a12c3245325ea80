"""What a caller asks of a generation, and what comes back.

``SamplingParams.check`` is the one place the ranges are enforced, so the terminal chat, the HTTP server and the
Python API refuse the same things with the same words. ``BadRequest`` names the offending field, which the server
puts into OpenAI's ``error.param``.
"""

from __future__ import annotations

from dataclasses import dataclass

from zhllama.errors import ZhllamaError

MAX_STOP_STRINGS = 4  # OpenAI's limit; more would only slow the hold-back search


class BadRequest(ZhllamaError):
    """A request the engine refuses; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_exclusive_lane(self) -> bool:
        """Seeded and repetition-penalised requests cannot share a batch's sampler (see ``infer.hf``)."""
        return self.seed is not None or self.repetition_penalty != 1.0

    def check(self, max_tokens_limit: int | None = None) -> SamplingParams:
        _int("max_tokens", self.max_tokens, 1, max_tokens_limit)
        _number("temperature", self.temperature, 0.0, 2.0)
        _int("top_k", self.top_k, 0, None)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _number("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_open=True)
        if self.seed is not None:
            _int("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise BadRequest("stop must be a list of non-empty strings", "stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}", "stop")
        return self


def _int(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{name} must be {bound}, got {value}", name)


def _number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise BadRequest(f"{name} must be a number, got {value!r}", name)
    if value < low or value > high or (low_open and value == low):
        left = "(" if low_open else "["
        raise BadRequest(f"{name} must be in {left}{low:g}, {high:g}], got {value:g}", name)


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
