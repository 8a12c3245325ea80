"""Chunked linear cross-entropy: the output projection and the fp32 cross-entropy a chunk of targets at a time.

With a Chinese-extended vocabulary the output layer dominates the memory of a step: batch 8 x 2048 at 55,296
pieces makes 3.6 GB of fp32 logits, and their gradient as much again. Here the full ``[targets, vocab]`` logits
never exist: the hidden states of the target positions go through ``lm_head`` ``rows`` at a time
(`chunk_rows`: about 2**25 logits, 128 MiB in fp32, and never under 256 rows so that a GPU matmul stays efficient).

* **Where it runs.** `scoring.token_nll` calls `chunked_nll`. The model is called as usual, through every wrapper
  (DDP, accelerate's autocast, peft), but for that one forward the plain ``nn.Linear`` behind ``lm_head`` (itself,
  or the active copy inside peft's ``ModulesToSaveWrapper``) has its ``forward`` replaced by a closure that takes
  the final hidden states and returns the per-target NLL instead of logits. The loss is therefore computed inside
  the wrapper's forward, so DDP sees ``lm_head.weight`` used like any other weight (its reducer is prepared for
  the backward of that forward; with ``find_unused_parameters`` the graph search from the outputs finds it).
  Running the head outside the wrapper would leave DDP's reducer unprepared and the head's gradient unreduced.
* **What it refuses** (then `scoring.token_nll` takes the plain path, or raises when chunking was demanded):
  a head that is not a plain ``nn.Linear`` without bias (a quantised or LoRA-adapted ``lm_head``), a weight that
  is not a plain ``nn.Parameter`` (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions), a model under FSDP or
  DeepSpeed (their gathering of weights around a module's forward and backward is not exercised here), and a
  head whose ``forward`` is already patched (accelerate's device-map hooks). If the model never calls the
  head, its output logits are real logits and the plain path scores them.
* **Same numbers as the plain path.** Each chunk's logits are ``h @ W.T`` in the dtype the plain head would use
  (the autocast dtype under autocast, else the weights'), then fp32 ``log_softmax``; the gradient of the logits
  is cast back to that dtype before the two backward matmuls, exactly as the plain graph does, and the weight's
  gradient is accumulated over chunks in fp32. Tied embeddings need nothing: ``lm_head.weight`` is the embedding
  matrix and autograd sums its two gradients. Gradient hooks on the weight (``new-rows``) see the whole gradient.
* **Backward.** For ``per="sum"`` with gradients, both gradients are computed during the forward (Liger's way:
  three matmuls per chunk, as the plain path does) and kept until backward, which only scales them. For
  per-row and per-token losses (preference training) the backward recomputes each chunk's logits, since its
  gradient weighs every target differently.
* **GPU.** With ``liger-kernel`` installed (``pip install zhllama[liger]``) and the tensors on CUDA, the training
  sum goes through Liger's fused Triton kernel instead.

Imports torch and zhllama.scoring/errors only; `scoring` imports this module inside `token_nll`.
"""

from __future__ import annotations

import functools

import torch

from zhllama.errors import ZhllamaError
from zhllama.scoring import Nll

CHUNK_LOGITS = 1 << 25  # logits per chunk (128 MiB in fp32)
MIN_ROWS = 256
_REFUSED_WRAPPERS = ("FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine")


def chunk_rows(vocab: int) -> int:
    """Target positions per chunk for a vocabulary of `vocab` pieces."""
    return max(MIN_ROWS, CHUNK_LOGITS // max(vocab, 1))


def _unwrap(model):
    """The module behind DDP (``.module``) and torch.compile (``._orig_mod``); None under FSDP or DeepSpeed."""
    seen = 0
    while True:
        if any(c.__name__ in _REFUSED_WRAPPERS for c in type(model).__mro__):
            return None
        inner = getattr(model, "_orig_mod", None) or model.__dict__.get("_modules", {}).get("module")
        if inner is None or seen > 8:
            return model
        model, seen = inner, seen + 1


def head_linears(model) -> list[torch.nn.Linear] | str:
    """The plain Linear layers the model's ``lm_head`` may call (one, or peft's original and trainable copies),
    or why the chunked path cannot be used."""
    inner = _unwrap(model)
    if inner is None:
        return "the model is sharded by FSDP or DeepSpeed"
    try:
        head = inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if not isinstance(head, torch.nn.Module):
        return "the model has no output embeddings"
    linears = []
    for module in head.modules():
        if type(module) is torch.nn.Linear:
            linears.append(module)
        elif type(module).__name__ not in ("ModulesToSaveWrapper", "ModuleDict"):
            return f"its lm_head holds a {type(module).__name__}, not a plain Linear"
    if not linears:
        return "its lm_head holds no Linear"
    for linear in linears:
        if linear.bias is not None:
            return "its lm_head has a bias"
        if type(linear.weight) is not torch.nn.Parameter or hasattr(linear.weight, "ds_id"):
            return f"its lm_head weight is a {type(linear.weight).__name__}, not a plain Parameter"
        if "forward" in vars(linear):
            return "its lm_head forward is already patched (hooks)"
    return linears


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the logits the plain head would produce: autocast's, else the operands' common one."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk's logits, ``(rows, vocab)`` in the operands' dtype, into `out` when given."""
    return torch.matmul(hidden, weight.t(), out=out)


class _ChunkBuffers:
    """One chunk's logits (compute dtype) and fp32 log-probabilities, allocated once per pass and reused by every
    chunk: a fresh chunk of 100+ MiB is a fresh mmap on a CPU, paid again in page faults each time."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.logits = torch.empty((rows, vocab), dtype=dtype, device=device)
        self.fp32 = self.logits if dtype == torch.float32 else torch.empty((rows, vocab), device=device)

    def log_probs(self, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, stats: dict | None) -> torch.Tensor:
        """fp32 log-probabilities of the chunk ``h @ w.T`` (a view of the buffer); argmax hits added to
        ``stats["correct"]``."""
        logits = chunk_logits(h, w, out=self.logits[:len(h)])
        if stats is not None:
            stats["correct"] += int((logits.argmax(-1) == targets).sum())
        fp32 = logits if self.fp32 is self.logits else self.fp32[:len(h)].copy_(logits)
        return _log_softmax_(fp32)

    def in_compute_dtype(self, grad: torch.Tensor) -> torch.Tensor:
        """The fp32 logits gradient in the dtype of the backward matmuls (the plain graph casts it the same way)."""
        return grad if self.fp32 is self.logits else self.logits[:len(grad)].copy_(grad)


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """fp32 `logits` turned into log-probabilities in place: ATen's row-wise kernel keeps each row in cache, where
    logsumexp, a subtraction and exp would each stream the whole chunk through memory (3x the time on a CPU)."""
    return torch.log_softmax(logits, -1, out=logits)


def _logp_grad(logp: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """d(NLL)/d(logits) from fp32 log-probabilities, in place: softmax minus the one-hot target, times `scale`."""
    grad = logp.exp_()
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    return grad if scale is None else grad.mul_(scale[:, None])


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, without a product tensor when the dtypes agree (hidden states stay fp32 under autocast)."""
    if out.dtype == a.dtype:
        torch.matmul(a, b, out=out)
    else:
        out.copy_(a @ b)


def _accumulate(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w += g.T @ h in fp32: inside the matmul when the operands are fp32 (no product tensor per chunk)."""
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h)
    else:
        grad_w += (g.t() @ h).float()


class _ChunkedNll(torch.autograd.Function):
    """Per-target NLL ``(n,)`` (or its sum when ``summed``) of ``hidden @ weight.T``, ``rows`` targets at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int, dtype, summed: bool, grads: tuple[bool, bool], stats):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            nats = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if summed and grads[0] else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if summed and grads[1] else None
            if stats is not None:
                stats["correct"] = 0
            buffers = _ChunkBuffers(min(rows, len(hidden)), weight.shape[0], dtype, hidden.device)
            for s in range(0, len(hidden), rows):
                h, t = hidden[s:s + rows].to(dtype), targets[s:s + rows]
                logp = buffers.log_probs(h, w, t, stats)
                nats[s:s + rows] = -logp.gather(1, t[:, None]).squeeze(1)
                if grad_h is not None or grad_w is not None:
                    g = buffers.in_compute_dtype(_logp_grad(logp, t, None))
                    if grad_h is not None:
                        _matmul_into(grad_h[s:s + rows], g, w)
                    if grad_w is not None:
                        _accumulate(grad_w, g, h)
        ctx.rows, ctx.dtype, ctx.summed, ctx.w_dtype = rows, dtype, summed, weight.dtype
        if summed:
            ctx.grad_h, ctx.grad_w = grad_h, grad_w
            return nats.sum()
        ctx.save_for_backward(hidden, weight, targets)
        return nats

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[:2]
        if ctx.summed:
            # Scaled in place, so the gradients computed in forward serve one backward only (a retained graph's
            # second backward would find them gone, and is refused).
            if getattr(ctx, "spent", False):
                raise RuntimeError("a second backward through the chunked loss; score with chunked=False")
            grad_h, grad_w, ctx.grad_h, ctx.grad_w, ctx.spent = ctx.grad_h, ctx.grad_w, None, None, True
            grad_h = grad_h.mul_(grad_out.to(grad_h.dtype)) if need_h and grad_h is not None else None
            grad_w = grad_w.mul_(grad_out).to(ctx.w_dtype) if need_w and grad_w is not None else None
            return grad_h, grad_w, None, None, None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        rows, dtype = ctx.rows, ctx.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            buffers = _ChunkBuffers(min(rows, len(hidden)), weight.shape[0], dtype, hidden.device)
            for s in range(0, len(hidden), rows):
                h, t = hidden[s:s + rows].to(dtype), targets[s:s + rows]
                g = buffers.in_compute_dtype(_logp_grad(buffers.log_probs(h, w, t, None), t,
                                                        grad_out[s:s + rows].float()))
                if need_h:
                    _matmul_into(grad_h[s:s + rows], g, w)
                if need_w:
                    _accumulate(grad_w, g, h)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None, None


def _liger():
    """Liger's fused linear cross-entropy, or None when liger-kernel is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def linear_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, summed: bool,
               rows: int | None = None, stats: dict | None = None, use_liger: bool = True) -> torch.Tensor:
    """NLL of `targets` (n,) under ``hidden (n, H) @ weight.T``: its fp32 sum when `summed`, else (n,) per target.

    Never builds more than `rows` (default `chunk_rows`) rows of logits. `stats`, a dict, receives the number of
    targets that are the argmax prediction under ``"correct"``.
    """
    rows = rows or chunk_rows(weight.shape[0])
    dtype = compute_dtype(hidden, weight)
    grads = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    liger = _liger() if use_liger and summed and stats is None and hidden.is_cuda and len(hidden) else None
    if liger is not None and any(grads):
        loss = liger(hidden.to(dtype), weight.to(dtype), targets, reduction="sum")
        return (loss[0] if isinstance(loss, tuple) else loss).float()
    return _ChunkedNll.apply(hidden, weight, targets, rows, dtype, summed, grads, stats)


def chunked_nll(model, inputs: dict[str, torch.Tensor], targets: torch.Tensor, per: str, with_accuracy: bool,
                linears: list[torch.nn.Linear], rows: int | None = None) -> tuple[Nll | None, torch.Tensor | None]:
    """`scoring.token_nll` through the chunked head: `targets` are the shifted labels (batch, seq) with IGNORE.

    `linears` come from `head_linears`; for the duration of one forward of `model` they score instead of
    projecting (see the module docstring). Returns the Nll, or (None, the logits) when the model's forward did not
    go through its lm_head and its output is plain logits after all.
    """
    from zhllama.scoring import IGNORE

    counted = targets != IGNORE
    picked = targets[counted]
    stats = {} if with_accuracy else None
    calls = []

    def scoring_head(linear: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        calls.append(linear)
        return linear_nll(hidden[counted], linear.weight, picked, summed=per == "sum", rows=rows, stats=stats)

    for linear in linears:
        linear.forward = functools.partial(scoring_head, linear)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        for linear in linears:
            del linear.forward
    if not calls:  # the model did not go through its lm_head: these are the plain logits
        return None, out.logits
    if len(calls) > 1:
        raise ZhllamaError(f"the model called its lm_head {len(calls)} times in one forward; score it with "
                           "chunked=False")
    nats = out.logits
    if per == "row":
        rows_of = counted.nonzero()[:, 0]
        nats = torch.zeros(len(targets), device=nats.device).index_add_(0, rows_of, nats)
    return Nll(nats, int(counted.sum()), stats["correct"] if stats is not None else 0), None
