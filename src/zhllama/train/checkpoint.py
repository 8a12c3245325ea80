"""Checkpoints that are complete or absent: written under a temporary name, renamed when every file is in.

Every rank writes into the same temporary folder (``.step-NNNNNN.partial``, a name they all know without asking
each other), between barriers the loop holds; the main process then puts it in place with artifacts.replace_dir,
the last step of every zhllama output.

A checkpoint holds the weights (safetensors), the optimizer and scheduler state, every rank's RNG state and
the step, which fixes the data position. Nothing is unpickled when loading: tensors come back through
safetensors or torch.load(weights_only=True), the rest through JSON.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zhllama.artifacts import replace_dir
from zhllama.errors import ZhllamaError
from zhllama.runs import STATE, checkpoint_dir, list_checkpoints


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state[k] for k in sorted(state) if k.startswith("cuda")])


def begin(run_dir: Path, step: int, is_main: bool) -> Path:
    """The temporary folder a checkpoint is written into (created by the main process)."""
    tmp = checkpoint_dir(run_dir, step).with_name(f".step-{step:06d}.partial")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def write_rank_files(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    (tmp / f"python-rng-rank{rank}.json").write_text(json.dumps(random.getstate()))


def write_main_files(tmp: Path, model_state: dict, optimizer_state: dict | None, scheduler) -> None:
    """The weights, the optimizer state (None where the engine keeps its own: DeepSpeed) and the schedule."""
    # safetensors refuses shared storage; tied weights appear once per name, so store contiguous copies.
    save_file({k: v.detach().contiguous().clone() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))


def finish(tmp: Path, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    final = checkpoint_dir(run_dir, step)
    replace_dir(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, rank: int) -> dict:
    """Everything in a checkpoint, as plain tensors and dicts; a clear error if any part is damaged."""
    try:
        state = json.loads((path / STATE).read_text())
        loaded = {
            "state": state,
            "model": load_file(str(path / "model.safetensors")),
            # DeepSpeed keeps its optimizer partitions in its own checkpoint (engine/), read by the engine.
            "optimizer": None if state.get("engine", "").startswith("deepspeed") else torch.load(
                path / "optimizer.pt", weights_only=True),
            "scheduler": json.loads((path / "scheduler.json").read_text()),
        }
        rng_file = path / f"rng-rank{rank}.pt"
        loaded["rng"] = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
        py_rng = path / f"python-rng-rank{rank}.json"
        loaded["python_rng"] = json.loads(py_rng.read_text()) if py_rng.exists() else None
    except Exception as exc:  # truncated files raise many different errors
        raise ZhllamaError(f"checkpoint {path} is corrupt or incomplete ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    return loaded


def restore_python_rng(state) -> None:
    if state is not None:
        random.setstate((state[0], tuple(state[1]), state[2]))
