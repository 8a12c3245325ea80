"""One interface for every generation backend: ``stream`` (sync), ``astream`` (asyncio) and ``generate``.

A backend only implements ``_submit``: start generating for one prompt, report new token ids through a callback
from any thread, and return a function that cancels. Everything above token ids is shared, so every backend
streams the same way: complete characters only (``IncrementalDecoder``), stop strings held back and cut
(``StopStrings``), the same finish reasons and token counts. The HF backend (``infer.hf``) batches requests with
transformers' continuous batching; a llama.cpp or vLLM backend implements the same ``_submit``.
"""

from __future__ import annotations

import asyncio
import queue
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from zhllama.infer.params import BadRequest, Completion, Delta, SamplingParams
from zhllama.infer.prompt import PromptBuilder
from zhllama.infer.stream import IncrementalDecoder, StopStrings

# sink(new_token_ids, finished, error): called by a backend, from any thread, in order.
Sink = Callable[[list[int], bool, str | None], None]


class Engine(ABC):
    name: str  # what /v1/models lists
    tokenizer: Any
    prompt: PromptBuilder
    context_length: int
    eos_ids: list[int]
    max_tokens_limit: int = 4096

    @abstractmethod
    def _submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> Callable[[], None]:
        """Start a generation; return a function that cancels it (safe to call after it finished)."""

    def close(self) -> None:  # noqa: B027 - backends without resources need nothing
        pass

    def healthy(self) -> bool:
        """False once the backend can no longer generate (the server's /health answers 503)."""
        return True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- prompts -------------------------------------------------------------------------------------------

    def encode_chat(self, messages: Any, params: SamplingParams, truncate: bool = False,
                    tools: list[dict] | None = None, opening: str = "") -> list[int]:
        """Prompt ids for a conversation (with the `tools` it may call, and the `opening` the reply must start
        with: ``PromptBuilder.encode``), checked against the context left after ``max_tokens``."""
        room = self._room(params)
        return self.prompt.encode(messages, max_prompt_tokens=room, truncate=truncate, tools=tools, opening=opening)

    def encode_text(self, text: str, params: SamplingParams) -> list[int]:
        """Prompt ids for a raw completion prompt (BOS added as the tokenizer's config says)."""
        return self.check_prompt(self.tokenizer(text)["input_ids"], params)

    def check_prompt(self, ids: list[int], params: SamplingParams) -> list[int]:
        """``ids``, if they fit the context left after ``max_tokens``; a ``BadRequest`` naming the lengths if not."""
        if len(ids) > self._room(params):
            raise BadRequest(f"the prompt is {len(ids)} tokens; at most {self._room(params)} fit the model's "
                             f"context ({self.context_length}) with max_tokens={params.max_tokens}", "prompt")
        return ids

    def _room(self, params: SamplingParams) -> int:
        room = self.context_length - params.max_tokens
        if room < 1:
            raise BadRequest(f"max_tokens={params.max_tokens} leaves no room for a prompt in the model's context "
                             f"of {self.context_length} tokens", "max_tokens")
        return room

    # --- generation ----------------------------------------------------------------------------------------

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Delta]:
        """Deltas as they come; closing the iterator early cancels the generation. Bad params raise here."""
        params.check(self.max_tokens_limit)
        return self._stream(prompt_ids, params)

    def astream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Like ``stream``; a cancelled task (a client that went away) cancels the generation at once."""
        params.check(self.max_tokens_limit)
        return self._astream(prompt_ids, params)

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Delta]:
        events: queue.Queue = queue.Queue()
        cancel = self._submit(list(prompt_ids), params, lambda *event: events.put(event))
        text = _TextAssembler(self, params)
        try:
            while not text.done:
                delta = text.push(*events.get())
                if delta is not None:
                    yield delta
        finally:
            if not text.backend_finished:
                cancel()

    async def _astream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = self._submit(list(prompt_ids), params,
                              lambda *event: loop.call_soon_threadsafe(events.put_nowait, event))
        text = _TextAssembler(self, params)
        try:
            while not text.done:
                delta = text.push(*(await events.get()))
                if delta is not None:
                    yield delta
        finally:
            if not text.backend_finished:
                cancel()

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        parts, last = [], None
        for last in self.stream(prompt_ids, params):
            parts.append(last.text)
        return _completion(prompt_ids, parts, last)

    async def agenerate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        parts, last = [], None
        async for last in self.astream(prompt_ids, params):
            parts.append(last.text)
        return _completion(prompt_ids, parts, last)


def _completion(prompt_ids: list[int], parts: list[str], last: Delta | None) -> Completion:
    assert last is not None and last.finish_reason is not None
    if last.error:
        raise RuntimeError(f"generation failed: {last.error}")
    return Completion("".join(parts), len(prompt_ids), last.completion_tokens, last.finish_reason)


class _TextAssembler:
    """Token ids in, ``Delta``s out: complete characters, stop strings cut, finish reason on the last one."""

    def __init__(self, engine: Engine, params: SamplingParams):
        self.decoder = IncrementalDecoder(engine.tokenizer)
        self.stops = StopStrings(tuple(params.stop) + tuple(engine.prompt.stop))
        self.eos_ids = set(engine.eos_ids)
        self.max_tokens = params.max_tokens
        self.tokens = 0
        self.done = self.backend_finished = False

    def push(self, new_ids: list[int], finished: bool, error: str | None) -> Delta | None:
        self.backend_finished = self.backend_finished or finished
        if error is not None:
            self.done = True
            return Delta(self.stops.flush(), self.tokens, "error", error)
        text, reason = "", None
        for token in new_ids:
            self.tokens += 1
            if token in self.eos_ids:
                reason = "stop"
                break
            text += self.stops.push(self.decoder.push(token))
            if self.stops.stopped:
                reason = "stop"
                break
            if self.tokens >= self.max_tokens:
                reason = "length"
                break
        if reason is None and finished:
            reason = "length" if self.tokens >= self.max_tokens else "stop"
        if reason is None:
            return Delta(text, self.tokens) if text else None
        if not self.stops.stopped:
            text += self.stops.push(self.decoder.flush())
            text += self.stops.flush()
        self.done = True
        return Delta(text, self.tokens, reason)
