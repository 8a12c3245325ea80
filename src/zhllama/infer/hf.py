"""The HF backend: transformers' continuous batching, plus an exclusive lane for what it cannot batch.

Why continuous batching (``model.init_continuous_batching``): it is transformers' own scheduler with a paged KV
cache. Several requests decode in one forward pass, and a new request joins the running batch at the next step
instead of waiting for the others. It runs on CPU and GPU, and it samples with per-request temperature, top-k and
top-p. So we did not write a scheduler.

What it cannot do per request is a seed (the batch shares one random generator) or a repetition penalty (its
processor is dropped). Such requests take the exclusive lane: the batch pauses, ``model.generate`` runs alone under
the request's seed, and the batch resumes. They are reproducible, but they do not batch.

No request may stop the batch for the others. A request's own failures stay its own: values the batch cannot take
are refused before they reach it (``SamplingParams.check``), and an error while handing a request its tokens fails
that request alone. An error inside a batch step cannot be traced to one request, and transformers then stops its
loop and fails every request in it; we restart the loop at once, and the requests that had already made tokens go
on from where they were (prompt plus tokens so far), so only those that joined in the failing step fail. A request
caught in two failures fails, so a request that keeps failing the batch cannot keep the engine down.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zhllama.infer.cb_sampling import NO_TOP_K, install_fast_sampling
from zhllama.infer.engine import Engine, Sink
from zhllama.infer.params import SamplingParams
from zhllama.infer.prompt import end_of_turn_ids, prompt_builder
from zhllama.scoring import pad_id

log = logging.getLogger("zhllama.infer")


@dataclass
class _Live:
    """One request on the batch path, with what it needs to go on after the batch loop was restarted."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    tokens: list[int] = field(default_factory=list)  # handed to the sink so far
    seen: int = 0  # tokens of the current submission already read from its outputs
    failures: int = 0  # batch failures it was caught in
    request_id: str = ""  # its id in the current batch loop
    cancelled: bool = False


class HFEngine(Engine):
    def __init__(self, model, tokenizer, template: str | None = None, name: str = "zhllama",
                 max_tokens_limit: int = 4096, max_concurrency: int = 16):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.continuous_api import OutputRouter

        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.prompt = prompt_builder(tokenizer, template)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_tokens_limit = min(max_tokens_limit, self.context_length - 1)
        self.eos_ids = end_of_turn_ids(tokenizer, self.prompt.stop)
        self.pad_id = pad_id(tokenizer, default=self.eos_ids[0])
        self._exclusive = threading.Lock()
        self._ids = itertools.count()

        engine = self

        class Router(OutputRouter):
            """Hands each output to its request's sink; outputs of cancelled requests are dropped."""

            def __init__(self):
                super().__init__()
                self.sinks: dict[str, object] = {}

            def deliver(self, output):
                with self._lock:
                    sink = self.sinks.get(output.request_id)
                if sink is None:
                    return
                try:
                    sink(output)
                except Exception as exc:  # this runs in the batch loop: a raise here would stop it for everyone
                    engine._fail_alone(output.request_id, exc)

            def deliver_batch(self, outputs):
                for output in outputs:
                    self.deliver(output)

        # The generation config only decides which per-request processors exist: each must have a non-default
        # value here, and every request then passes its own.
        config = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.9, max_new_tokens=256,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        self.router = Router()
        self.manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(
                per_request_processors=True, max_requests_per_batch=max_concurrency,
                **_cache_size(model, self.context_length, max_concurrency)))
        self.manager.output_router = self.router
        install_fast_sampling(self.manager)
        self._live: dict[str, _Live] = {}
        self._restart_lock = threading.Lock()
        self._crashing = False  # set, in the batch thread, while transformers fails the requests of a crash
        self._carry_on: list[_Live] = []  # requests that go on once the loop is restarted
        self._closed = self._broken = False
        self.restarts = 0
        crash = self.manager._handle_critical_error
        self.manager._handle_critical_error = lambda error, processor: self._on_crash(crash, error, processor)
        self.manager.start()

    def close(self) -> None:
        self._closed = True
        self.manager.stop(block=True)

    def healthy(self) -> bool:
        # A loop that stopped on an error is restarted (``_on_crash``): unhealthy only if that failed, or closed.
        return not (self._closed or self._broken)

    def _on_crash(self, crash, error, processor) -> None:
        log.error("the batch loop failed (%s: %s); restarting it", type(error).__name__, error)
        self._crashing = True
        try:
            crash(error, processor)  # fails every request in the batch; on_output keeps those that can go on
        finally:
            self._crashing = False
        threading.Thread(target=self._restart, daemon=True, name="zhllama-restart").start()

    def _restart(self) -> None:
        if not self._ensure_running():
            return
        carry_on, self._carry_on = self._carry_on, []
        for live in carry_on:
            self._add(live)

    def _ensure_running(self) -> bool:
        """Start the batch loop again if it stopped on an error; False if the engine is closed or cannot start."""
        with self._restart_lock:
            if self._closed:
                return False
            status = self.manager.background_thread_status
            if self.manager.is_running() and status.can_accept_new_requests() is None:
                return True
            thread = self.manager._generation_thread
            if thread is not None:
                thread.join(timeout=30)  # the failed loop is on its way out
            try:
                if thread is not None and thread.is_alive():
                    raise RuntimeError("the failed batch loop did not exit within 30 s")
                # A fresh cache and scheduler, not the old ones reset: the failed step may have left half-written
                # blocks that prefix sharing would hand to later requests with the same prompt start.
                self.manager.batch_processor = None
                gc.collect()
                if self.model.device.type == "cuda":
                    torch.cuda.empty_cache()  # transformers sizes a GPU cache from the memory free now
                self.manager.start()
            except Exception:
                log.exception("the batch loop could not be restarted")
                self._broken = True
                return False
            self.restarts += 1
            return True

    def _fail_alone(self, request_id: str, exc: Exception) -> None:
        log.exception("request %s failed while receiving its tokens", request_id)
        live = self._live.pop(request_id, None)
        self.router.sinks.pop(request_id, None)
        self.manager.cancel_request(request_id)
        if live is not None:
            try:
                live.sink([], True, f"{type(exc).__name__}: {exc}")
            except Exception:  # the sink itself is broken: nobody is left to tell
                log.exception("request %s could not be told that it failed", request_id)

    def busy_requests(self) -> int:
        """Requests the batch still holds (a cancelled or finished one must not stay here)."""
        return len(self.router.sinks)

    def _submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink):
        if params.needs_exclusive_lane:
            return self._submit_exclusive(prompt_ids, params, sink)
        live = _Live(list(prompt_ids), params, sink)
        self._add(live)

        def cancel():
            live.cancelled = True  # a request waiting for a restart is not resubmitted
            self._live.pop(live.request_id, None)
            if self.router.sinks.pop(live.request_id, None) is not None:
                self.manager.cancel_request(live.request_id)

        return cancel

    def _add(self, live: _Live) -> None:
        """Put ``live`` into the batch: its prompt plus any tokens it made before a restart, for the tokens left."""
        request_id = live.request_id = f"zh-{next(self._ids)}"
        left = live.params.max_tokens - len(live.tokens)
        if live.cancelled or left <= 0:
            live.sink([], True, None)
            return
        live.seen = 0

        def on_output(output):
            new, live.seen = list(output.generated_tokens[live.seen:]), len(output.generated_tokens)
            if output.error:
                self._live.pop(request_id, None)
                self.router.sinks.pop(request_id, None)
                if self._crashing and live.tokens and live.failures == 0 and not self._closed:
                    live.failures += 1
                    live.tokens += new
                    if new:
                        live.sink(new, False, None)
                    self._carry_on.append(live)  # resubmitted by _restart
                    return
                live.sink(new, True, output.error)
                return
            if new or output.is_finished():
                live.tokens += new
                live.sink(new, output.is_finished(), None)
            if output.is_finished():
                self._live.pop(request_id, None)
                self.router.sinks.pop(request_id, None)

        greedy, params = live.params.greedy, live.params
        self._live[request_id] = live
        self.router.sinks[request_id] = on_output
        # Greedy is top-k 1: the batch samples, and a one-token distribution samples its argmax.
        kwargs = dict(request_id=request_id, max_new_tokens=left, streaming=True, eos_token_id=self.eos_ids,
                      temperature=1.0 if greedy else float(params.temperature),
                      top_k=1 if greedy else int(params.top_k or NO_TOP_K),
                      top_p=1.0 if greedy else float(params.top_p))
        try:
            added = self.manager.add_request(live.prompt_ids + live.tokens, **kwargs)
            if added is None and self._ensure_running():  # the loop was stopping after a failure: try once more
                added = self.manager.add_request(live.prompt_ids + live.tokens, **kwargs)
        except Exception as exc:
            added, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "the batch loop is not running"
        if added is None:  # transformers drops a request it cannot take, and its caller would wait forever
            self._live.pop(request_id, None)
            self.router.sinks.pop(request_id, None)
            live.sink([], True, why)

    def _submit_exclusive(self, prompt_ids: list[int], params: SamplingParams, sink: Sink):
        from transformers import GenerationConfig, StoppingCriteria
        from transformers.generation.streamers import BaseStreamer

        cancelled = threading.Event()

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() hands over the prompt first
                    self.prompt_seen = True
                    return
                sink([int(t) for t in value.reshape(-1).tolist()], False, None)

            def end(self):
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        # float(): JSON's 2 is an int, and HF's warpers refuse an int temperature or penalty (a failed request)
        config = GenerationConfig(
            do_sample=not params.greedy, max_new_tokens=params.max_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id, repetition_penalty=float(params.repetition_penalty),
            **({} if params.greedy else {"temperature": float(params.temperature), "top_k": params.top_k or None,
                                          "top_p": float(params.top_p)}))
        cuda = [self.model.device.index or 0] if self.model.device.type == "cuda" else []

        def run():
            try:
                self._ensure_running()  # pause() needs a running loop, and one may be restarting after a failure
                with self._exclusive, self.manager.pause(), torch.random.fork_rng(devices=cuda):
                    if cancelled.is_set():
                        return
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    ids = torch.tensor([prompt_ids], device=self.model.device)
                    self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                        streamer=Streamer(), stopping_criteria=[Cancelled()])
                sink([], True, None)
            except Exception as exc:  # the request fails, the server stays up
                sink([], True, f"{type(exc).__name__}: {exc}")

        threading.Thread(target=run, daemon=True, name="zhllama-exclusive").start()
        return cancelled.set


def _cache_size(model, context_length: int, max_concurrency: int, page_size: int = 256) -> dict:
    """On CPU, a paged cache just big enough for ``max_concurrency`` full contexts.

    Left to itself, transformers sizes the cache from free memory: on CPU that took 13 GB and 10 s of page faults
    for a 20M-parameter model. On a GPU its sizing from free device memory is what we want.
    """
    if model.device.type == "cuda":
        return {}
    pages_per_request = -(-context_length // page_size)
    return {"page_size": page_size, "num_blocks": max_concurrency * pages_per_request + 1,
            "max_batch_tokens": max(512, max_concurrency * 8)}


def load_hf_engine(model_dir: str | Path, template: str | None = None, device: str = "auto",
                   name: str | None = None, max_tokens_limit: int = 4096, max_concurrency: int = 16,
                   quantize: str | None = None, rope: str | None = None,
                   rope_factor: float | None = None) -> HFEngine:
    """The HF engine for a model folder: its tokenizer checked against the model, on ``device``, optionally
    quantised (int8/int4) and with RoPE scaling. ``zhllama.infer.load_engine`` chooses between this and llama.cpp;
    an already loaded model becomes an engine with ``HFEngine(model, tokenizer, ...)``."""
    from zhllama.model.loading import load_checked

    model, tokenizer = load_checked(model_dir, device, quantize=quantize, rope=rope, rope_factor=rope_factor)
    return HFEngine(model, tokenizer, template, name or Path(model_dir).resolve().name, max_tokens_limit,
                    max_concurrency)
