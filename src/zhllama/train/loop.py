"""The one training loop, shared by continued pretraining, SFT and preference training.

The data decides what a batch is (packed blocks, templated conversations with loss masks, preference pairs) and
the objective what is minimised (train/objective.py); the loop decides everything else: precision, accumulation,
schedule, clipping, distribution, checkpoints, logging. Every step sees the same global batch whatever the number
of processes, and the loss is normalised by the global number of units (target tokens, or pairs), so a 2-process
run follows a 1-process run with the same global batch.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from zhllama.config import TrainConfig
from zhllama.errors import ZhllamaError
from zhllama.runs import latest_checkpoint
from zhllama.scoring import IGNORE, token_nll  # noqa: F401 (IGNORE: callers take it from here)
from zhllama.train import checkpoint, engine
from zhllama.train.logs import RunLog, plot_loss
from zhllama.train.objective import LanguageModelling, Objective
from zhllama.train.trainable import parameter_groups, trainable_state


class TrainData(Protocol):
    """Batches addressed by position in the global sample order, so that resuming and sharding are exact."""

    def train_batch(self, samples: list[int]) -> dict[str, torch.Tensor]: ...

    def num_train(self) -> int: ...

    def sample_tokens(self) -> np.ndarray: ...  # real (not padding) tokens of each training sample, by index

    def val_batches(self, batch_size: int, limit: int, rank: int, world: int) -> list[dict[str, torch.Tensor]]: ...


def val_index_batches(n: int, batch_size: int, limit: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of the first batch_size * limit validation items, cut into batches."""
    ids = list(range(min(n, batch_size * limit)))[rank::world]
    return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]


@dataclass
class LoopResult:
    model: torch.nn.Module
    steps: int
    last_val: dict | None
    # The whole weights on the main process where the engine shards them (FSDP, DeepSpeed): `model` then holds
    # only this rank's part, and final/ is written from this.
    state_dict: dict[str, torch.Tensor] | None = None


def bf16_is_fast() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """--precision, and the accelerate launch config's mixed_precision when launched by it: auto follows the
    launch config; an explicit choice that disagrees with it is refused rather than one of them ignored."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ZhllamaError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    launched = engine.launched_precision()
    if precision == "auto":
        return launched or ("bf16" if bf16_is_fast() else "fp32")
    if launched is not None and launched != precision:
        raise ZhllamaError(f"--precision {precision} disagrees with the accelerate launch config (mixed_precision "
                           f"{'no' if launched == 'fp32' else launched}); make them agree, or leave --precision auto")
    return precision


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int):
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_ids(step: int, micro: int, rank: int, cfg: TrainConfig, world: int, n: int) -> list[int]:
    """Indices into the data for one micro-batch: a fresh seeded permutation per epoch."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    first = step * per_step + micro * cfg.batch_size * world + rank * cfg.batch_size
    out = []
    for g in range(first, first + cfg.batch_size):
        epoch, offset = divmod(g, n)
        out.append(int(_epoch_order(cfg.seed, epoch, n)[offset]))
    return out


def tokens_seen(steps: int, cfg: TrainConfig, world: int, counts: np.ndarray,
                groups: np.ndarray | None = None) -> int | np.ndarray:
    """Real tokens in the first `steps` global batches, the x axis of `eval track`; per group of samples (the
    sources of a mix, by sample index) when `groups` is given.

    The samples of those steps are the first steps * global-batch entries of the epoch orders (sample_ids): every
    whole epoch holds each sample once, then comes the start of the next order. Counted from the order, the total
    needs no state, so a resumed run logs what an uninterrupted one does.
    """
    n = len(counts)
    epochs, rest = divmod(steps * cfg.batch_size * cfg.grad_accum * world, n)
    order = _epoch_order(cfg.seed, epochs, n)[:rest]
    if groups is None:
        return int(epochs * int(counts.sum()) + int(counts[order].sum()))
    size = int(groups.max()) + 1
    return (epochs * np.bincount(groups, weights=counts, minlength=size)
            + np.bincount(groups[order], weights=counts[order], minlength=size))


def token_loss(model, batch: dict[str, torch.Tensor], with_accuracy: bool = False,
               sparse_logits: bool = True) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy, number of targets, and (for evaluation) correct argmax predictions.

    The labels are shifted, not the logits: slicing the logits would copy the largest tensor of the step. When
    under 90% of positions are targets (SFT: only the replies are), the model projects only the target positions
    onto the vocabulary (`logits_to_keep` as a mask): for a small model the vocabulary projection is most of
    the work, and the loss is the same.
    """
    # Under autocast the logits are bf16; token_nll takes the cross-entropy in fp32.
    nll = token_nll(model, batch, sparse=0.9 if sparse_logits else 0.0, with_accuracy=with_accuracy)
    return nll.nats, nll.count, nll.correct


def _all_sum(accelerator, *values: float) -> list[float]:
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def _all_max(accelerator, *values: float) -> list[float]:
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.gather(tensor[None]).max(dim=0).values.tolist()


@torch.no_grad()
def evaluate(model, data: TrainData, cfg: TrainConfig, accelerator, objective: Objective) -> dict | None:
    batches = data.val_batches(cfg.batch_size, cfg.eval_batches, accelerator.process_index,
                               accelerator.num_processes)
    # Sharded engines gather weights inside every forward, a collective: every rank runs as many forwards as the
    # busiest one, the extra ones on a batch whose result is not counted.
    (most,) = _all_max(accelerator, len(batches))
    filler = batches[:1] or data.val_batches(cfg.batch_size, 1, 0, 1)[:1]
    model.eval()
    sums: dict[str, float] = {"loss": 0.0, "units": 0.0}
    for i in range(int(most)):
        batch = batches[i] if i < len(batches) else filler[0]
        with accelerator.autocast():
            loss, stats = objective(model, {k: v.to(accelerator.device) for k, v in batch.items()}, True)
        counted = i < len(batches)  # every rank sees every key, so the sums below line up across ranks
        for key, value in {"loss": loss, "units": objective.units(batch), **stats}.items():
            sums[key] = sums.get(key, 0.0) + (float(value) if counted else 0.0)
    model.train()
    totals = dict(zip(sums, _all_sum(accelerator, *sums.values()), strict=True))
    units = totals.pop("units")
    if units == 0:
        return None
    return objective.summary({key: value / units for key, value in totals.items()})


@contextmanager
def run_accelerator(precision: str, grad_accum: int):
    """An Accelerator for one run, its process-global state cleared before and after.

    accelerate keeps the precision and accumulation settings in process-wide singletons and refuses a second
    Accelerator with another precision; a notebook that trains in fp32 and then in bf16 would be stuck. The
    process group (PartialState) is kept: it belongs to the launcher, not to the run.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        with engine.cpu_engine_state() as sharded_on_cpu:
            # cpu=True is what makes accelerate set up gloo under torchrun on a machine without a GPU (for FSDP and
            # DeepSpeed, cpu_engine_state has set it up already).
            yield Accelerator(mixed_precision="bf16" if precision == "bf16" else "no",
                              gradient_accumulation_steps=grad_accum,
                              cpu=not torch.cuda.is_available() and not sharded_on_cpu)
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def train_loop(model, data: TrainData, cfg: TrainConfig, run_dir: Path, resume: bool,
               objective: Objective | None = None) -> LoopResult:
    """Train `model` for cfg.max_steps on `data`, minimising `objective` (default: next-token cross-entropy)."""
    precision = resolve_precision(cfg.precision)
    with run_accelerator(precision, cfg.grad_accum) as accelerator:
        objective = objective or LanguageModelling(chunked=None if cfg.chunked_loss else False)
        return _train(accelerator, model, data, cfg, run_dir, resume, objective)


def _train(accelerator, model, data: TrainData, cfg: TrainConfig, run_dir: Path, resume: bool,
           objective: Objective) -> LoopResult:
    from accelerate.utils import set_seed

    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"  # logged: "auto" depends on the CPU
    set_seed(cfg.seed)
    if data.num_train() == 0:
        raise ZhllamaError("the training data has no complete block or example")

    engine.configure(accelerator, cfg)
    sharded = engine.engine_name(accelerator) in engine.SHARDED
    # The fused kernel (HF Trainer's default too) takes a tenth of the CPU time of the foreach one; the sharded
    # engines' CPU parameters (FSDP2's DTensors) keep the default.
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=torch.cuda.is_available() or not sharded or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    start = 0
    log = RunLog(run_dir, enabled=main)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    found = latest_checkpoint(run_dir) if resume else None
    if found is not None:
        saved = checkpoint.load(found, rank)
        engine.check_resume(found, saved["state"], accelerator)
        missing = set(trainable_state(model)) - set(saved["model"])
        if missing:
            raise ZhllamaError(f"checkpoint {found} does not match this model (missing {sorted(missing)[0]})")
        model.load_state_dict(saved["model"], strict=False)  # the whole weights, before any engine shards them
        if not sharded:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start = saved["state"]["step"]
        if saved["rng"] is not None:
            checkpoint.set_rng_state(saved["rng"])
        checkpoint.restore_python_rng(saved["python_rng"])
        log.truncate_after(start)
        if main:
            print(f"resuming from {found} (step {start})", file=sys.stderr)
    if cfg.compile:
        # In place (nn.Module.compile), not torch.compile(model): no `_orig_mod.` wrapper, so state_dict keys,
        # checkpoints and final/ are the same as without it, and resume works either way.
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    if found is not None and sharded:
        engine.restore_sharded(accelerator, model, optimizer, saved, found)
    model.train()

    n = data.num_train()
    sample_tokens = data.sample_tokens()
    # A mix of sources (train/pretrain.py MixedTrainData) logs the share of tokens each has had so far.
    sources = data.source_of(np.arange(n)) if hasattr(data, "source_of") else None
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="training",
               disable=not main or None, dynamic_ncols=True)
    last_val = None
    window_tokens, window_start = 0, time.perf_counter()
    for step in bar:
        micro = [data.train_batch(sample_ids(step, m, rank, cfg, world, n)) for m in range(cfg.grad_accum)]
        (global_units,) = _all_sum(accelerator, sum(objective.units(b) for b in micro))
        step_sums = {"loss": 0.0}
        for batch in micro:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss_sum, stats = objective(model, batch)
                # Sum over the global batch / its units; accelerate averages over ranks and divides by the
                # accumulation steps, which the two factors undo.
                accelerator.backward(loss_sum * (world * cfg.grad_accum / global_units))
                for key, value in {"loss": loss_sum.detach(), **stats}.items():
                    step_sums[key] = step_sums.get(key, 0.0) + float(value) / global_units
                if accelerator.sync_gradients:
                    grad_norm = _as_float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        means = objective.summary(dict(zip(step_sums, _all_sum(accelerator, *step_sums.values()), strict=True)))
        step_tokens = sum(b["input_ids"].numel() for b in micro) * world
        window_tokens += step_tokens
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            log.write({"kind": "train", "step": done, **means, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm, "tokens": tokens_seen(done, cfg, world, sample_tokens),
                       "tokens_per_s": rate, "precision": precision, "peak_memory_mb": peak_memory_mb(),
                       **_source_shares(data, sources, done, cfg, world, sample_tokens)})
            bar.set_postfix(loss=f"{means['loss']:.3f}", tok_s=f"{rate:,.0f}")
            window_tokens, window_start = 0, time.perf_counter()
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            last_val = evaluate(model, data, cfg, accelerator, objective)
            if last_val:
                log.write({"kind": "val", "step": done, **last_val})
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            _save(accelerator, model, optimizer, scheduler, run_dir, done, cfg)
    log.close()
    full_state = engine.full_state_dict(accelerator, model)  # a collective where the weights are sharded
    accelerator.wait_for_everyone()
    if main and (run_dir / "log.jsonl").exists():
        plot_loss(run_dir)
    # Without the autocast wrapper: the model handed back computes in the precision its caller asks for.
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    _check_vocab_unchanged(vocab_rows, model, full_state)
    return LoopResult(model=model, steps=cfg.max_steps, last_val=last_val, state_dict=full_state)


def _source_shares(data, sources, steps: int, cfg: TrainConfig, world: int, counts: np.ndarray) -> dict:
    if sources is None:
        return {}
    seen = tokens_seen(steps, cfg, world, counts, sources)
    return {"source_shares": {name: round(float(t / seen.sum()), 6) for name, t in zip(data.names, seen, strict=False)}}


def peak_memory_mb() -> float:
    """The most memory this process has held so far, in MiB: the GPU's allocated peak on CUDA, else the peak
    resident set size (what the kernel reports as ru_maxrss: KiB on Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _as_float(norm) -> float:
    """The gradient norm as a number: FSDP2 returns a DTensor, DeepSpeed a tensor, a float, or None before the
    first step it takes."""
    if norm is None:
        return float("nan")
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _check_vocab_unchanged(rows: int, model, full_state: dict | None) -> None:
    """Training never resizes the embeddings (that is `model extend-vocab`, offline): a run that ends with another
    number of rows than it began with has gone wrong somewhere, and must not write final/."""
    if full_state is not None:
        now = next(v.shape[0] for k, v in full_state.items() if k.endswith("embed_tokens.weight"))
    elif not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        now = model.get_input_embeddings().weight.shape[0]
    else:
        return  # sharded weights on a rank that holds no gathered copy
    if now != rows:
        raise ZhllamaError(f"the embeddings changed from {rows:,} to {now:,} rows during training; zhllama never "
                           "resizes them while training (grow the vocabulary with `zhllama model extend-vocab`)")


def _save(accelerator, model, optimizer, scheduler, run_dir: Path, step: int, cfg: TrainConfig) -> None:
    main = accelerator.is_main_process
    tmp = checkpoint.begin(run_dir, step, main)
    accelerator.wait_for_everyone()
    checkpoint.write_rank_files(tmp, accelerator.process_index)
    # Sharded engines gather the whole weights and optimizer state with collectives, so every rank takes part.
    state = engine.full_state_dict(accelerator, model)
    optimizer_state = engine.optimizer_state(accelerator, model, optimizer)
    engine.save_engine(accelerator, model, tmp)
    if main:
        names = trainable_state(accelerator.unwrap_model(model))
        state = {k: v for k, v in state.items() if k in names} if state is not None else names
        checkpoint.write_main_files(tmp, state, optimizer_state, scheduler)
    accelerator.wait_for_everyone()
    if main:
        checkpoint.finish(tmp, run_dir, step, {"step": step, "world_size": accelerator.num_processes,
                                               "engine": engine.engine_name(accelerator),
                                               "engine_files": engine.engine_file_hashes(tmp)}, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
