"""CPU inference, one run, five ways: HF fp32, HF int8 (dynamic), llama.cpp f16, q8_0 and q4_0.

For each: decode tokens/s (greedy, batch 1, a fixed number of new tokens, 2 threads) and perplexity on held-out
built-in Chinese text (the same token ids for every arm, non-overlapping windows). Goal (issue 7): llama.cpp
q4_0 at least 3x HF fp32 in tokens/s, with perplexity within 5% of f16. Chinese-LLaMA-Alpaca-2 reports +8%
perplexity at 4-bit for comparison.

The model is the `small` preset (hidden 512, 8 layers) made on the spot with the extended demo vocabulary, or
--model DIR. A random model's logits are nearly flat, so its perplexity barely moves under quantisation; give a
trained model with --model for a perplexity figure that means something (the table says which was used).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results

PROMPT = "请介绍一下中国的长城。"


def make_model(work: Path, preset: str) -> Path:
    from zhllama import model, tokenizer
    from zhllama.assets import llama2_vocab_gguf

    folder = work / f"model-{preset}"
    if (folder / "config.json").exists():
        return folder
    tok = tokenizer.from_gguf(llama2_vocab_gguf(), work / "tok-llama2")
    return Path(model.init_model(preset, tok, folder, seed=0))


def heldout_ids(tok, n_tokens: int) -> list[int]:
    from zhllama.data import builtin

    ids = [tok.bos_token_id]
    for doc in builtin.documents("heldout", sources=("peoples_daily", "sanguo")):
        ids += tok(doc["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def hf_arm(model_dir: Path, quantize: str | None, ids: list[int], window: int, new_tokens: int) -> dict:
    from zhllama.model.loading import load_checked

    model, tok = load_checked(model_dir, "cpu", quantize=quantize)
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            logits = model(torch.tensor([chunk[:-1]])).logits[0].float().numpy()
            nll += nll_from_logits(logits, np.array(chunk[1:]))
            n += len(chunk) - 1
        prompt = torch.tensor([tok(PROMPT)["input_ids"]])
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    return {"ppl": math.exp(nll / n), "tokens_scored": n, "decode_tok_s": new_tokens / seconds}


def greedy_tokens(llm, prompt_ids: list[int], n: int) -> int:
    """Decode n tokens greedily (EOS does not stop it: every arm makes the same number of tokens)."""
    made = 0
    for _ in llm.generate(prompt_ids, top_k=1, reset=True):
        made += 1
        if made == n:
            break
    return made


def llamacpp_arm(gguf: Path, ids: list[int], prompt_ids: list[int], window: int, new_tokens: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=window + 8, n_threads=os.cpu_count(), n_batch=window,
                logits_all=True, verbose=False)
    try:
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            llm.reset()
            llm.eval(chunk[:-1])
            logits = np.array(llm.scores[:len(chunk) - 1])
            nll += nll_from_logits(logits, np.array(chunk[1:]))
            n += len(chunk) - 1
        greedy_tokens(llm, prompt_ids, 4)  # warm-up
        start = time.perf_counter()
        made = greedy_tokens(llm, prompt_ids, new_tokens)
        seconds = time.perf_counter() - start
    finally:
        llm.close()
    return {"ppl": math.exp(nll / n), "tokens_scored": n, "decode_tok_s": made / seconds,
            "file_mb": gguf.stat().st_size / 2**20}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="an HF model folder (default: a random `small`)")
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens for perplexity")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--name", default="cpu_inference", help="results file name under benchmarks/results/")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    from zhllama.export.gguf import export_gguf
    from zhllama.model.loading import load_tokenizer

    work = args.work / "cpu_inference"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or make_model(work, args.preset)
    tok = load_tokenizer(model_dir)
    ids = heldout_ids(tok, args.tokens)
    prompt_ids = tok(PROMPT)["input_ids"]
    results = {}
    for arm, quantize in (("HF fp32", None), ("HF int8 (dynamic)", "int8")):
        results[arm] = hf_arm(model_dir, quantize, ids, args.window, args.new_tokens)
        print(arm, results[arm], flush=True)
    for qtype in ("f16", "q8_0", "q4_0"):
        gguf = export_gguf(model_dir, work / f"{Path(model_dir).name}-{qtype}.gguf", qtype)
        results[f"llama.cpp {qtype}"] = llamacpp_arm(Path(gguf), ids, prompt_ids, args.window, args.new_tokens)
        print(qtype, results[f"llama.cpp {qtype}"], flush=True)

    base, f16 = results["HF fp32"], results["llama.cpp f16"]
    lines = [f"## CPU inference: {'`' + str(args.model) + '`' if args.model else 'random `' + args.preset + '` preset'}"
             f", {os.cpu_count()} threads, {len(ids):,} held-out tokens (windows of {args.window}), "
             f"{args.new_tokens} new tokens greedy", "",
             "| arm | decode tok/s | vs HF fp32 | perplexity | vs llama.cpp f16 | file MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x | "
                     f"{r['ppl']:.3f} | {100 * (r['ppl'] / f16['ppl'] - 1):+.2f}% | "
                     f"{r.get('file_mb', float('nan')):.1f} |")
    q4 = results["llama.cpp q4_0"]
    lines += ["", f"q4_0 vs HF fp32 tokens/s: **{q4['decode_tok_s'] / base['decode_tok_s']:.2f}x** (goal >= 3x); "
              f"q4_0 perplexity vs f16: **{100 * (q4['ppl'] / f16['ppl'] - 1):+.2f}%** (goal within 5%)."]
    write_results(args.name, {"model": str(args.model or args.preset), "results": results,
                                    "tokens": len(ids), "window": args.window, "new_tokens": args.new_tokens},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
