"""The HF backend: transformers' continuous batching, plus an exclusive lane for what it cannot batch.

Why continuous batching (``model.init_continuous_batching``): it is transformers' own scheduler with a paged KV
cache. Several requests decode in one forward pass, and a new request joins the running batch at the next step
instead of waiting for the others. It runs on CPU and GPU, and it samples with per-request temperature, top-k and
top-p. So we did not write a scheduler.

What it cannot do per request is a seed (the batch shares one random generator) or a repetition penalty (its
processor is dropped). Such requests take the exclusive lane: the batch pauses, ``model.generate`` runs alone under
the request's seed, and the batch resumes. They are reproducible, but they do not batch.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import torch

from zhllama.infer.cb_sampling import NO_TOP_K, install_fast_sampling
from zhllama.infer.engine import Engine, Sink
from zhllama.infer.params import SamplingParams
from zhllama.infer.prompt import end_of_turn_ids, prompt_builder


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
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._exclusive = threading.Lock()
        self._ids = itertools.count()

        class Router(OutputRouter):
            """Hands each output to its request's sink; outputs of cancelled requests are dropped."""

            def __init__(self):
                super().__init__()
                self.sinks: dict[str, object] = {}

            def deliver(self, output):
                with self._lock:
                    sink = self.sinks.get(output.request_id)
                if sink is not None:
                    sink(output)

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
        self.manager.start()

    def close(self) -> None:
        self.manager.stop(block=True)

    def healthy(self) -> bool:
        return self.manager.is_running()

    def busy_requests(self) -> int:
        """Requests the batch still holds (a cancelled or finished one must not stay here)."""
        return len(self.router.sinks)

    def _submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink):
        if params.needs_exclusive_lane:
            return self._submit_exclusive(prompt_ids, params, sink)
        request_id = f"zh-{next(self._ids)}"
        seen = 0

        def on_output(output):
            nonlocal seen
            new, seen = list(output.generated_tokens[seen:]), len(output.generated_tokens)
            if output.error:
                sink(new, True, output.error)
            elif new or output.is_finished():
                sink(new, output.is_finished(), None)
            if output.is_finished():
                self.router.sinks.pop(request_id, None)

        self.router.sinks[request_id] = on_output
        greedy = params.greedy
        # Greedy is top-k 1: the batch samples, and a one-token distribution samples its argmax.
        self.manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=params.max_tokens,
                                 streaming=True, eos_token_id=self.eos_ids,
                                 temperature=1.0 if greedy else float(params.temperature),
                                 top_k=1 if greedy else int(params.top_k or NO_TOP_K),
                                 top_p=1.0 if greedy else float(params.top_p))

        def cancel():
            if self.router.sinks.pop(request_id, None) is not None:
                self.manager.cancel_request(request_id)

        return cancel

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

        config = GenerationConfig(
            do_sample=not params.greedy, max_new_tokens=params.max_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id, repetition_penalty=params.repetition_penalty,
            **({} if params.greedy else {"temperature": params.temperature, "top_k": params.top_k or None,
                                          "top_p": params.top_p}))
        cuda = [self.model.device.index or 0] if self.model.device.type == "cuda" else []

        def run():
            try:
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


def load_engine(model_dir: str | Path, template: str | None = None, device: str = "auto",
                name: str | None = None, max_tokens_limit: int = 4096, max_concurrency: int = 16,
                quantize: str | None = None, rope: str | None = None, rope_factor: float | None = None) -> HFEngine:
    """The HF engine for a model folder: its tokenizer checked against the model, on ``device``, optionally
    quantised (int8/int4) and with RoPE scaling."""
    from zhllama.model.loading import load_checked

    model, tokenizer = load_checked(model_dir, device, quantize=quantize, rope=rope, rope_factor=rope_factor)
    return HFEngine(model, tokenizer, template, name or Path(model_dir).resolve().name, max_tokens_limit,
                    max_concurrency)
