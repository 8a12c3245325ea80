"""The two arms of the pretraining throughput comparison, each run in a fresh process (`run_arm`), shared by
benchmarks/pretrain_throughput.py (CPU, tiny preset) and benchmarks/gpu_check.py (CUDA, 1b preset, seq 2048).

* ``baseline``: the seed's recipe, HF ``Trainer`` over a list of `group_texts`-style blocks with labels = input_ids
  (its default optimizer, fused AdamW; bf16 as ``bf16=True``), SDPA attention.
* ``ours``: `zhllama.train.pretrain` on the same packed blocks, through the training loop.

Both get the same model folder, the same blocks, batch, sequence length, learning rate, schedule, weight decay and
clipping, at the same precision. A step's time is taken from its start to its end (the baseline: Trainer's
on_step_begin to on_step_end, leaving out its data fetch and logging; ours: the loop's per-step log window, which
includes the data fetch and leaves out the logging); the first `warmup` steps are not counted. Peak memory: the
child's peak RSS (ru_maxrss), and on CUDA torch's peak allocated memory.

Run as a script it is the child: ``python pretrain_arms.py ARM --model DIR --packed DIR ... --result FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("baseline", "ours")
HERE = Path(__file__).resolve()


def _rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        now = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        now = float("nan")
    return now, peak


def _baseline(a) -> list[float]:
    """What the seed's pretrain_clm.py does; returns each step's seconds."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from zhllama.data.pack import PackedData

    packed = PackedData(a.packed)
    blocks = [packed.block(i)[: a.seq].tolist() for i in range(len(packed))]

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = torch.tensor(blocks[i], dtype=torch.long)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    steps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - self.began)

    model = AutoModelForCausalLM.from_pretrained(str(a.model), attn_implementation="sdpa", dtype=torch.float32)
    args = TrainingArguments(output_dir=str(a.work / "hf-trainer"), per_device_train_batch_size=a.batch,
                             max_steps=a.steps, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2,
                             weight_decay=0.1, max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(), bf16=a.precision == "bf16",
                             dataloader_drop_last=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=default_data_collator,
            callbacks=[Clock()]).train()
    return steps


def _ours(a) -> list[float]:
    import shutil

    from zhllama.config import TrainConfig
    from zhllama.runs import read_log
    from zhllama.train import pretrain

    run = a.work / "ours"
    shutil.rmtree(run, ignore_errors=True)
    extra = {"compile": True} if a.compile else {}
    cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch, lr=1e-3, warmup_steps=2, save_every=10**9,
                      eval_every=10**9, log_every=1, precision=a.precision, seq_len=a.seq, **extra)
    pretrain(a.model, a.packed, run, cfg)
    tokens = a.batch * a.seq
    return [tokens / r["tokens_per_s"] for r in read_log(run) if r["kind"] == "train"]


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("arm", choices=ARMS)
    for flag in ("--model", "--packed", "--work", "--result"):
        p.add_argument(flag, type=Path, required=True)
    for flag in ("--steps", "--warmup", "--batch", "--seq"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--precision", choices=("fp32", "bf16"), required=True)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    import torch

    import zhllama.train  # noqa: F401 (both arms pay for the same imports before the first figure)

    rss_start, _ = _rss_mib()
    began = time.perf_counter()
    steps = (_baseline if a.arm == "baseline" else _ours)(a)
    wall = time.perf_counter() - began
    _, peak = _rss_mib()
    timed = steps[a.warmup:]
    out = {"arm": a.arm, "precision": a.precision, "compile": a.compile, "steps": len(steps), "warmup": a.warmup,
           "tokens_per_s": len(timed) * a.batch * a.seq / sum(timed), "step_s": [round(s, 4) for s in steps],
           "warmup_s": sum(steps[:a.warmup]), "wall_s": wall, "rss_start_mib": rss_start, "peak_rss_mib": peak,
           "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    a.result.write_text(json.dumps(out, indent=2) + "\n")


def run_arm(arm: str, *, model: Path, packed: Path, work: Path, precision: str, steps: int, warmup: int, batch: int,
            seq: int, compile: bool = False, env: dict | None = None, timeout: float = 1800) -> dict:
    """One arm in a fresh Python process; its figures (tokens/s, peak memory) as a dict."""
    work.mkdir(parents=True, exist_ok=True)
    result = work / f"{arm}-{precision}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE), arm, "--model", str(model), "--packed", str(packed), "--work", str(work),
           "--result", str(result), "--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch),
           "--seq", str(seq), "--precision", precision, *(["--compile"] if compile else [])]
    log = work / f"{arm}-{precision}.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
    if rc != 0 or not result.is_file():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{arm} ({precision}) exited {rc}: {' | '.join(tail)[:400]} (see {log})")
    return json.loads(result.read_text())


if __name__ == "__main__":
    child(sys.argv[1:])
