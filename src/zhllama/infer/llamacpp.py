"""The llama.cpp backend: a GGUF file served through llama-cpp-python, the fast path on a CPU.

A ``llama_cpp.Llama`` holds one context and is not thread-safe, so one worker thread runs the requests one at a
time, in arrival order (no batching). Everything above token ids is the shared ``Engine`` code, and the tokenizer is
an HF tokenizer rebuilt from the GGUF's own vocabulary (``zhllama.tokenizer.from_gguf``), with the GGUF's chat
template: prompts, stop strings and incremental decoding are exactly those of the HF backend.

Determinism: every request starts from an empty KV cache (``reset``). llama.cpp could reuse a cached prompt prefix,
but then a token's logits depend on how its prefix was evaluated (one batch or token by token), and on a model with
close logits that changes greedy replies; the same request gives the same reply here whatever ran before.

Sampling differs from the HF backend in one detail: llama.cpp applies top-k and top-p before the temperature, HF
after it. Greedy (temperature 0) is the argmax in both.
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import struct
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.errors import ZhllamaError
from zhllama.infer.engine import Engine, Sink
from zhllama.infer.params import SamplingParams
from zhllama.infer.prompt import end_of_turn_ids, prompt_builder
from zhllama.tokenizer.gguf_vocab import GGUF_MAGIC, is_gguf

DEFAULT_MAX_CONTEXT = 4096  # the KV cache is allocated up front: a 32k-context model must not take 32k by default
LLAMA_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"; our seeds map below it


class _Cancelled(Exception):
    """Raised inside the prompt evaluation when the request was cancelled."""


CLOSED = "the llama.cpp engine is closed"


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    cancelled: threading.Event = field(default_factory=threading.Event)


class LlamaCppEngine(Engine):
    def __init__(self, llm, tokenizer, template: str | None = None, name: str = "zhllama",
                 max_tokens_limit: int = 4096):
        self.llm, self.tokenizer, self.name = llm, tokenizer, name
        self.prompt = prompt_builder(tokenizer, template)
        self.context_length = int(llm.n_ctx())
        self.max_tokens_limit = min(max_tokens_limit, self.context_length - 1)
        self.eos_ids = end_of_turn_ids(tokenizer, self.prompt.stop)
        self.n_vocab = int(llm.n_vocab())
        self._eval = llm.eval
        # generate() evaluates the whole prompt in one call; evaluating it batch by batch here (the same split
        # llama.cpp makes, so the numbers are identical) lets a cancelled request stop between batches.
        llm.eval = self._cancellable_eval
        self._current: _Job | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._work, daemon=True, name="zhllama-llamacpp")
        self._worker.start()

    # --- Engine --------------------------------------------------------------------------------------------

    def _submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> Callable[[], None]:
        job = _Job(list(prompt_ids), params, sink)
        if self._closed:
            sink([], True, CLOSED)
        else:
            self._jobs.put(job)
        return job.cancelled.set

    def healthy(self) -> bool:
        return not self._closed and self._worker.is_alive()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # the running request ends with an error at its next token or prompt batch
        self._jobs.put(None)
        self._worker.join(timeout=30)
        while not self._jobs.empty():  # submitted while closing, behind the worker's last job
            job = self._jobs.get_nowait()
            if job is not None:
                job.sink([], True, CLOSED)
        if not self._worker.is_alive():  # freeing the model under a running evaluation would crash the process
            self.llm.close()

    # --- the worker ----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue  # its client is gone: nobody reads the sink
            if self._closed:
                job.sink([], True, CLOSED)
                continue
            self._current = job
            try:
                self._run(job)
            except _Cancelled:
                pass
            except Exception as exc:  # the request fails, the worker goes on
                job.sink([], True, f"{type(exc).__name__}: {exc}")
            finally:
                self._current = None

    def _run(self, job: _Job) -> None:
        ids, params = job.prompt_ids, job.params
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= i < self.n_vocab for i in ids):
            raise ValueError(f"the prompt has token ids outside the vocabulary (0..{self.n_vocab - 1})")
        if len(ids) + params.max_tokens > self.context_length:
            raise ValueError(f"{len(ids)} prompt tokens + max_tokens={params.max_tokens} exceed the context of "
                             f"{self.context_length} tokens")
        seed = secrets.randbelow(LLAMA_RANDOM_SEED) if params.seed is None else params.seed % LLAMA_RANDOM_SEED
        self.llm.set_seed(seed)  # read when generate() builds its sampler
        self.llm.reset()
        greedy = params.greedy
        tokens = self.llm.generate(
            ids, temp=0.0 if greedy else float(params.temperature), top_k=0 if greedy else int(params.top_k),
            top_p=1.0 if greedy else float(params.top_p), min_p=0.0, typical_p=1.0,
            repeat_penalty=float(params.repetition_penalty), reset=True)
        count = 0
        # closing(): the generator stops right here; the token after the last one is never evaluated.
        with closing(tokens):
            for token in tokens:
                if job.cancelled.is_set():
                    return
                if self._closed:
                    raise RuntimeError(CLOSED)
                count += 1
                done = token in self.eos_ids or count >= params.max_tokens
                job.sink([int(token)], done, None)
                if done:
                    return
        job.sink([], True, None)

    def _cancellable_eval(self, tokens) -> None:
        step = max(1, int(self.llm.n_batch))
        for start in range(0, len(tokens), step):
            current = self._current
            if current is not None and current.cancelled.is_set():
                raise _Cancelled
            if self._closed:
                raise RuntimeError(CLOSED)
            self._eval(tokens[start:start + step])


# --- loading -------------------------------------------------------------------------------------------------


def load_llamacpp_engine(gguf_path: str | Path, template: str | None = None, name: str | None = None,
                         max_tokens_limit: int = 4096, n_ctx: int | None = None,
                         threads: int | None = None) -> LlamaCppEngine:
    """The llama.cpp engine for a GGUF file: context ``n_ctx`` (default: the trained one, at most 4096 tokens),
    ``threads`` CPU threads (default: all)."""
    path = _check_gguf_path(Path(gguf_path))
    llama_cpp = _import_llama_cpp()
    meta = _read_metadata(path)
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 2):
        raise ZhllamaError(f"n_ctx must be an integer of at least 2, got {n_ctx!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ZhllamaError(f"threads must be a positive integer, got {threads!r}")
    tokenizer = _tokenizer(path, meta["chat_template"])
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx or min(meta["context_length"], DEFAULT_MAX_CONTEXT),
                              n_threads=threads or os.cpu_count(), verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise ZhllamaError(f"{path}: llama.cpp cannot load it ({str(exc).splitlines()[0]})") from None
    if llm.n_vocab() != len(tokenizer):
        llm.close()
        raise ZhllamaError(f"{path}: llama.cpp has {llm.n_vocab()} tokens but the GGUF vocabulary rebuilt "
                           f"{len(tokenizer)}; the file is inconsistent")
    return LlamaCppEngine(llm, tokenizer, template, name or path.stem, max_tokens_limit)


def _check_gguf_path(path: Path) -> Path:
    if path.is_dir():
        if (path / "config.json").exists():
            raise ZhllamaError(f"{path} is an HF folder; --backend llamacpp takes a .gguf file "
                               "(make one with `zhllama export gguf`)")
        raise ZhllamaError(f"{path} is a folder; --backend llamacpp takes a .gguf file")
    if not path.exists():
        raise ZhllamaError(f"{path} does not exist; --backend llamacpp takes a .gguf file")
    if not is_gguf(path):
        raise ZhllamaError(f"{path} is not a GGUF file; --backend llamacpp takes a .gguf file "
                               "(make one with `zhllama export gguf`)")
    return path


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ZhllamaError(f"a GGUF file runs on llama.cpp, which needs llama-cpp-python ({exc}); install it with "
                           "`pip install 'zhllama[llamacpp]'` (`make setup` builds and caches the wheel)") from None
    return llama_cpp


def _read_metadata(path: Path) -> dict:
    """The trained context length and the chat template, read before llama.cpp allocates a context.

    A small header walk of our own: gguf.GGUFReader builds an array object per vocabulary entry and takes seconds
    for a 32k vocabulary, on every start.
    """
    try:
        with open(path, "rb") as fh:
            values = _gguf_header(fh)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ZhllamaError(f"{path}: not a readable GGUF file ({exc})") from None
    arch = values.get("general.architecture", "llama")
    context = values.get(f"{arch}.context_length")
    template = values.get("tokenizer.chat_template")
    return {"context_length": int(context) if isinstance(context, int) and context > 0 else DEFAULT_MAX_CONTEXT,
            "chat_template": template if isinstance(template, str) and template else None}


# GGUF value types (gguf.GGUFValueType): 0-7, 10-12 fixed-size scalars, 8 string, 9 array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _gguf_header(fh) -> dict:
    """Every scalar and string key of a GGUF (version 2 or 3) file; arrays are skipped, not read."""
    magic, version, _tensors, count = struct.unpack("<4sIQQ", fh.read(24))
    if magic != GGUF_MAGIC or version < 2:
        raise ValueError(f"not a GGUF v2/v3 header (version {version})")

    def string() -> str:
        (size,) = struct.unpack("<Q", fh.read(8))
        return fh.read(size).decode("utf-8")

    def value(kind: int):
        if kind == _STRING:
            return string()
        if kind in _SCALARS:
            fmt = "<" + _SCALARS[kind]
            return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, n = struct.unpack("<IQ", fh.read(12))
        if item in _SCALARS:
            fh.seek(n * struct.calcsize("<" + _SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(n):  # strings (the vocabulary) or nested arrays: walk past each
                if item == _STRING:
                    (size,) = struct.unpack("<Q", fh.read(8))
                    fh.seek(size, os.SEEK_CUR)
                else:
                    value(item)
        return None

    values = {}
    for _ in range(count):
        key = string()
        (kind,) = struct.unpack("<I", fh.read(4))
        values[key] = value(kind)
    return values


def _tokenizer(path: Path, chat_template: str | None):
    """An HF tokenizer from the GGUF's vocabulary, built once per file version and cached.

    from_gguf hashes the whole file for its provenance (seconds for a 7B model), so the folder is keyed by the
    file's path, size and modification time and reused on the next start.
    """
    from zhllama.assets import cache_dir
    from zhllama.model.loading import load_tokenizer
    from zhllama.tokenizer import from_gguf

    folder = tokenizer_cache_dir(path, cache_dir())
    if not (folder / "tokenizer.json").exists():
        from_gguf(path, folder)
    tokenizer = load_tokenizer(folder)
    # In memory only: the template comes from the GGUF every time, never from a stale cached copy.
    tokenizer.chat_template = chat_template
    return tokenizer


def tokenizer_cache_dir(path: Path, root: Path) -> Path:
    """Where the tokenizer rebuilt from ``path`` is cached under ``root``."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / "gguf-tokenizers" / f"{path.stem}-{key}"
