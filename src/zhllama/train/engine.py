"""The engine a run was launched under (one process, DDP, FSDP2, DeepSpeed ZeRO-2/3) and the few things that
differ between engines: how the process group starts on CPU, how the DeepSpeed config is filled, how whole
weights and optimizer state are gathered and restored. The loop (train/loop.py) is the same for all of them.

The engine is a launch choice: `torchrun` gives DDP, `accelerate launch --config_file <engine>.yaml` gives what
the config names. accelerate reads it from the environment the launcher sets.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from zhllama.config import TrainConfig
from zhllama.errors import ZhllamaError

SHARDED = ("fsdp", "deepspeed-zero2", "deepspeed-zero3")
ENGINE_STATE = "engine"  # DeepSpeed's own checkpoint, inside ours


def launched_engine() -> str | None:
    """The sharded engine `accelerate launch` asked for, from the environment it sets; None otherwise."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return None


def launched_precision() -> str | None:
    """bf16 or fp32 as the accelerate config says (`mixed_precision`), None when not launched by accelerate."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if value is None:
        return None
    if value not in ("no", "bf16"):
        raise ZhllamaError(f"mixed_precision {value} (from the accelerate launch config) is not supported: zhllama "
                           "trains in bf16 or fp32; set mixed_precision to bf16 or no")
    return "bf16" if value == "bf16" else "fp32"


@contextmanager
def cpu_engine_state():
    """Let FSDP and DeepSpeed run on CPU processes (tests, CI): both work over gloo, but accelerate enables them
    only on accelerator devices. The process group starts as accelerate's CPU one (gloo), then accelerate is
    told the processes are GPU-like so that it applies the engine the launcher asked for; the device stays CPU."""
    from accelerate import DistributedType, PartialState

    if torch.cuda.is_available() or launched_engine() is None:
        yield False
        return
    if launched_engine() == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    PartialState(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    try:
        yield True
    finally:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU


def engine_name(accelerator) -> str:
    from accelerate import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def configure(accelerator, cfg: TrainConfig) -> None:
    """Refuse what the engine cannot honour, and fill DeepSpeed's "auto" entries from zhllama's own settings (the
    loop hands DeepSpeed no DataLoader, so accelerate cannot infer them)."""
    engine = engine_name(accelerator)
    if engine in SHARDED and cfg.trainable not in ("all", "embeddings"):
        raise ZhllamaError(f"--trainable {cfg.trainable} is not supported under {engine} (its weights are sharded "
                           "or partitioned); launch it with torchrun (DDP) or on one process")
    if not engine.startswith("deepspeed"):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ZhllamaError(f"the DeepSpeed config sets its own {key}; zhllama's loop brings AdamW and its "
                               f"warm-up + cosine schedule: remove \"{key}\" from the config")
    for key, ours, flag in (("train_micro_batch_size_per_gpu", cfg.batch_size, "--batch-size"),
                            ("gradient_accumulation_steps", cfg.grad_accum, "--grad-accum"),
                            ("gradient_clipping", cfg.grad_clip, "--grad-clip")):
        value = ds.get(key, "auto")
        if value == "auto":
            ds[key] = ours
        elif float(value) != float(ours):
            raise ZhllamaError(f"{key} {value} in the DeepSpeed config disagrees with {flag} {ours}; set it to "
                               "\"auto\" or make them agree")
    zero = ds.setdefault("zero_optimization", {})
    if not torch.cuda.is_available():
        for key in ("offload_optimizer", "offload_param"):
            if (zero.get(key) or {}).get("device", "none") != "none":
                raise ZhllamaError(f"zero_optimization.{key} needs a CUDA GPU (DeepSpeed's offload kernels); set "
                                   "its device to none on this machine")
    if engine == "deepspeed-zero3":
        gather = "stage3_gather_16bit_weights_on_model_save"
        if zero.get(gather, "auto") is False:
            raise ZhllamaError(f"zero_optimization.{gather} is false in the DeepSpeed config (zero3_save_16bit_model "
                               "in accelerate's): final/ needs the gathered weights; set it to true")
        zero[gather] = True


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor] | None:
    """The whole weights on the main process, gathered from the shards; None where they are not sharded.

    Every rank must call it: under FSDP and ZeRO-3 the gather is a collective."""
    if engine_name(accelerator) not in SHARDED:
        return None
    state = accelerator.get_state_dict(model)
    return state if accelerator.is_main_process else None


def optimizer_state(accelerator, model, optimizer) -> dict | None:
    """The optimizer state our checkpoint keeps (optimizer.pt), on the main process: whole under one process, DDP
    and FSDP (gathered; every rank calls), and None under DeepSpeed, whose own checkpoint keeps it (save_engine)."""
    engine = engine_name(accelerator)
    if engine == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if accelerator.is_main_process else None
    if engine.startswith("deepspeed") or not accelerator.is_main_process:
        return None
    return optimizer.state_dict()


def save_engine(accelerator, model, folder: Path) -> None:
    """DeepSpeed's partitioned state (every rank writes its own part) under folder/engine."""
    if engine_name(accelerator).startswith("deepspeed"):
        model.save_checkpoint(str(folder / ENGINE_STATE), tag="state", save_latest=False)


def engine_file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of DeepSpeed's checkpoint. DeepSpeed reads its files with pickle (torch.load with
    weights_only=False); zhllama records their hashes when it writes them (state.json) and resumes only from
    files that still match, so nothing but what this run wrote is ever unpickled."""
    from zhllama.artifacts import file_sha256

    root = folder / ENGINE_STATE
    if not root.is_dir():
        return {}
    return {str(f.relative_to(root)): file_sha256(f) for f in sorted(root.rglob("*")) if f.is_file()}


def restore_sharded(accelerator, model, optimizer, saved: dict, checkpoint: Path) -> None:
    """Put a checkpoint's sharded state back after accelerator.prepare: FSDP's optimizer from the whole state in
    optimizer.pt, DeepSpeed's weights and optimizer partitions from its own checkpoint."""
    engine = engine_name(accelerator)
    if engine == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer.optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    elif engine.startswith("deepspeed"):
        if engine_file_hashes(checkpoint) != saved["state"].get("engine_files"):
            raise ZhllamaError(f"checkpoint {checkpoint}: the DeepSpeed files in {ENGINE_STATE}/ are not the ones this "
                               "run wrote (their SHA-256 differ from state.json); refusing to unpickle them")
        path, _ = model.load_checkpoint(str(checkpoint / ENGINE_STATE), tag="state", load_optimizer_states=True,
                                        load_lr_scheduler_states=False, load_module_strict=False)
        if path is None:
            raise ZhllamaError(f"checkpoint {checkpoint} has no DeepSpeed state ({ENGINE_STATE}/state)")


def check_resume(found: Path, state: dict, accelerator) -> None:
    """A checkpoint resumes only under the engine and number of processes that wrote it: the data position and the
    sharded state depend on both."""
    engine, world = engine_name(accelerator), accelerator.num_processes
    written = state.get("engine", "ddp" if state.get("world_size", 1) > 1 else "single"), state.get("world_size", 1)
    if written != (engine, world):
        raise ZhllamaError(f"checkpoint {found} was written by {written[0]} on {written[1]} process(es); this run is "
                           f"{engine} on {world}: resume with the same engine and number of processes")
