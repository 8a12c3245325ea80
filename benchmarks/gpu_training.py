"""The training sections of the GPU check (benchmarks/gpu_check.py): MFU of the training path, QLoRA SFT, FSDP and
DeepSpeed through `accelerate launch`, and the pretraining arms against HF Trainer. Each returns its figures, or
raises gpu_common.Skip.

Run as a script with --worker it is `train pretrain` through the library, for machines without the CLI's typer.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import ENV, SEQ, STEPS, WARMUP, Skip, free_gpu, need, one_line, peak_gib


def train_mfu(inp: dict, peak_flops: float | None, batch: int) -> dict:
    import numpy as np
    import torch

    from zhllama.data.pack import PackedData
    from zhllama.train.loop import token_loss
    from zhllama.train.run import load_for_training

    model = load_for_training(inp["1b"], SEQ).cuda().train()
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    matmul_params = params - model.get_input_embeddings().weight.numel()
    flops_per_token = 6 * matmul_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * SEQ
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    data = PackedData(inp["packed2048"])

    def step(x: torch.Tensor) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n, _ = token_loss(model, {"input_ids": x, "labels": x.clone()})
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss) / n

    while True:  # halve the micro-batch until it fits
        x = torch.from_numpy(np.stack([data.block(i % len(data)) for i in range(batch)]).astype(np.int64)).cuda()
        try:
            for _ in range(WARMUP):
                step(x)
            break
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            free_gpu()
            if batch == 1:
                raise
            batch //= 2
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        loss = step(x)
    torch.cuda.synchronize()
    tok_s = STEPS * batch * SEQ / (time.perf_counter() - start)
    mfu = tok_s * flops_per_token / peak_flops if peak_flops else None
    return {"params": params, "matmul_params": matmul_params, "flops_per_token": flops_per_token, "micro_batch": batch,
            "seq_len": SEQ, "steps": STEPS, "tokens_per_s": tok_s, "peak_flops": peak_flops, "mfu": mfu,
            "last_loss": loss, "peak_mem_gib": peak_gib(), "goal_mfu_50": None if mfu is None else mfu >= 0.5,
            "summary": f"{tok_s:,.0f} tok/s (micro-batch {batch} x {SEQ}), MFU "
                       + (f"{mfu:.1%} (goal >= 50%)" if mfu is not None else "- (unknown peak: --peak-tflops)")}


def sft_qlora(inp: dict, work: Path, steps: int = 8) -> dict:
    need("bitsandbytes", "tensorboard", "matplotlib")  # the NF4 base; RunLog and its loss plot
    from zhllama.config import SftConfig, load_config
    from zhllama.runs import read_log
    from zhllama.train import sft

    cfg = load_config(SftConfig, "sft_qlora", {"max_steps": WARMUP + steps, "grad_accum": 1, "log_every": 1,
                                               "save_every": 10**6, "eval_every": 10**6, "eval_batches": 2})
    out = sft(inp["1b"], [inp["sft"]], work / "sft-qlora", cfg)
    peak = peak_gib()
    rates = [r["tokens_per_s"] for r in read_log(out) if r["kind"] == "train"][WARMUP:]
    tok_s = len(rates) / sum(1 / r for r in rates)  # harmonic mean = tokens / time over the timed steps
    return {"recipe": "sft_qlora", "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "lora_r": cfg.lora.r,
            "timed_steps": len(rates), "tokens_per_s": tok_s, "peak_mem_gib": peak,
            "summary": f"{tok_s:,.0f} tok/s (batch {cfg.batch_size} x {cfg.seq_len}, r={cfg.lora.r}), "
                       f"peak {peak:.1f} GiB"}


def recipe(name: str) -> tuple[Path, bool]:
    """The engine config's path as users get it (`zhllama recipes NAME`), and whether the CLI could start; without
    it (typer missing) the package's own list, so the engines are still measured."""
    proc = subprocess.run([sys.executable, "-m", "zhllama", "recipes", name], capture_output=True, text=True,
                          env=ENV, timeout=120)
    if proc.returncode == 0 and proc.stdout.strip():
        return Path(proc.stdout.strip().splitlines()[-1]), True
    from zhllama.config import recipe_files

    found = [p for p in recipe_files() if p.stem == name]
    if not found:
        raise RuntimeError(f"no shipped engine config {name!r}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    return found[0], False


def distributed(inp: dict, work: Path, name: str, config: str) -> dict:
    if name == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except Exception as exc:
            raise Skip(f"import deepspeed failed ({one_line(exc)})") from None
    need("tensorboard", "matplotlib")
    from transformers import AutoModelForCausalLM

    from zhllama.runs import read_log

    path, cli = recipe(config)
    out = work / f"pretrain-{name}"
    train = ["--model", str(inp["small"]), "--data", str(inp["packed512"]), "--out", str(out), "--max-steps", "4",
             "--batch-size", "4", "--save-every", "1000", "--eval-every", "1000"]
    entry = ["-m", "zhllama", "train", "pretrain"] if cli else [str(Path(__file__).resolve()), "--worker"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--config_file", str(path),
           *entry, *train]
    log = work / f"{name}.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV, timeout=300).returncode
    if rc != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise RuntimeError(f"accelerate launch exited {rc}: {tail[0][:250] if tail else ''} (see {log})")
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    rows = [r for r in read_log(out) if r["kind"] == "train"]
    return {"config": str(path), "via": "zhllama CLI" if cli else "library worker (CLI cannot start here)",
            "preset": "small", "steps": rows[-1]["step"] if rows else None,
            "last_loss": rows[-1]["loss"] if rows else None, "final_params": sum(p.numel() for p in model.parameters()),
            "final_loads": True, "summary": f"4 steps, loss {rows[-1]['loss']:.3f}, final/ loads "
                                            f"({type(model).__name__})" if rows else "final/ loads; no train log"}


def pretrain_arms(inp: dict, work: Path, batch: int, steps: int = 8) -> dict:
    """Ours against the seed's Trainer at the same precision, as on the CPU (pretrain_throughput.py)."""
    need("tensorboard", "matplotlib")  # the run log of `train pretrain`
    from pretrain_arms import ARMS, run_arm

    out: dict = {}
    shown = []
    for precision in ("bf16", "fp32"):  # a failure (fp32 out of memory) leaves the other precision's figures
        try:
            r = {arm: run_arm(arm, model=inp["1b"], packed=inp["packed2048"], work=work / f"arms-{precision}",
                              precision=precision, steps=steps, warmup=WARMUP, batch=batch, seq=SEQ, env=ENV,
                              timeout=600) for arm in ARMS}
        except Exception as exc:
            out[precision] = {"error": one_line(exc)}
            shown.append(f"{precision}: ERROR {one_line(exc)[:120]}")
            continue
        ours, base = r["ours"], r["baseline"]
        r["speed_ratio"] = ours["tokens_per_s"] / base["tokens_per_s"]
        r["memory_ratio"] = ours["cuda_peak_gib"] / base["cuda_peak_gib"]
        out[precision] = r
        shown.append(f"{precision}: ours {ours['tokens_per_s']:,.0f} vs {base['tokens_per_s']:,.0f} tok/s "
                     f"({r['speed_ratio']:.2f}x), peak {ours['cuda_peak_gib']:.1f} vs {base['cuda_peak_gib']:.1f} GiB")
    return {**out, "batch": batch, "seq_len": SEQ, "steps": steps, "summary": "; ".join(shown)}


def worker(argv: list[str]) -> None:
    """`train pretrain` through the library, for machines where the CLI's own dependencies (typer) are missing."""
    import argparse

    from zhllama.config import TrainConfig
    from zhllama.train import pretrain

    p = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--out"):
        p.add_argument(flag, required=True)
    for flag in ("--max-steps", "--batch-size", "--save-every", "--eval-every"):
        p.add_argument(flag, type=int, required=True)
    a = p.parse_args(argv)
    pretrain(a.model, a.data, a.out, TrainConfig(max_steps=a.max_steps, batch_size=a.batch_size,
                                                 save_every=a.save_every, eval_every=a.eval_every))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2:])
