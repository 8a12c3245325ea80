"""Pretraining throughput and peak memory of our loop against the seed's recipe (HF Trainer over run_clm-style
`group_texts` blocks), at the same precision: the same tiny model, the same blocks of Chinese text, the same
sequence length and batch.

Arms (benchmarks/pretrain_arms.py): `baseline` (HF Trainer, labels = input_ids, its default fused AdamW) and `ours`
(`zhllama.train.pretrain`). Every arm runs in a fresh Python process (accelerate's process-wide state, allocator
and caches start clean; nothing one arm did is left for the other), the arms alternate (the first arm of each round
swaps), and each keeps its best of --rounds: load from elsewhere on the machine then hurts both alike.
Precisions: fp32 always, bf16 (autocast; Trainer's `bf16=True`) where the CPU has AVX512-BF16/AMX or on a GPU.
Vocabularies: Llama-2's 32,000 pieces, and the same extended to 55,296 with Chinese pieces (Chinese-LLaMA-Alpaca-2's
size), where the output layer dominates the step. Figures: steady-state tokens/s (the first --warmup steps left
out) and the child's peak RSS; ratios ours/baseline. Goals (issue 19): >= 1.2x tokens/s at the same precision and
>= 30% less peak memory at 55,296 pieces.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results
from pretrain_arms import ARMS, run_arm

VOCABS = (32_000, 55_296)


def corpus_file(data: Path, out: Path, chars: int) -> str:
    """Chinese text for the blocks: People's Daily from the shared data, else the built-in corpus."""
    source = data / "pretrain_zh" / "peoples_daily_199801.jsonl"
    if not source.is_file():
        from zhllama.data import builtin

        builtin.write_jsonl(out, "train", max_chars=chars)
        return "zhllama.data.builtin"
    n = 0
    with out.open("w", encoding="utf-8") as fh:
        for line in source.read_text(encoding="utf-8").splitlines(keepends=True):
            fh.write(line)
            n += len(json.loads(line)["text"])
            if n >= chars:
                break
    return str(source)


def prepare(args, work: Path) -> tuple[dict, str]:
    """Per vocabulary: the tiny model and the packed blocks."""
    from zhllama import model as zmodel
    from zhllama import tokenizer
    from zhllama.assets import llama2_vocab_gguf
    from zhllama.data.pack import pack

    corpus = work / "zh.jsonl"
    source = corpus_file(args.data, corpus, args.chars)
    llama2 = tokenizer.from_gguf(llama2_vocab_gguf(), work / "tok-32000")
    zh = sorted((args.data / "pretrain_zh").glob("*.jsonl")) or [corpus]
    toks = {32_000: llama2, 55_296: tokenizer.extend(llama2, zh, 55_296, work / "tok-55296", max_chars=3_000_000)}
    out = {}
    for vocab in args.vocabs:
        out[vocab] = {"model": zmodel.init_model("tiny", toks[vocab], work / f"tiny-{vocab}", seed=0),
                      "packed": pack(toks[vocab], [corpus], args.seq, work / f"packed-{vocab}")}
    return out, source


def main() -> None:
    from zhllama.train.loop import bf16_is_fast

    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=10, help="steps per arm, warm-up included")
    p.add_argument("--warmup", type=int, default=3, help="first steps not timed")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each arm keeps its best")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--chars", type=int, default=300_000, help="characters of Chinese text to pack")
    p.add_argument("--vocabs", default=",".join(map(str, VOCABS)), help="comma-separated, from 32000,55296")
    p.add_argument("--precisions", default=None, help="comma-separated (default: fp32, and bf16 where it is fast)")
    p.add_argument("--compile", action="store_true",
                   help="also an `ours --compile` arm, and its payback (results in pretrain_throughput_compile)")
    args = p.parse_args()
    args.vocabs = [int(v) for v in args.vocabs.split(",")]
    precisions = args.precisions.split(",") if args.precisions else ["fp32", *(["bf16"] if bf16_is_fast() else [])]
    arms = [*ARMS, *(["ours_compile"] if args.compile else [])]
    began = time.perf_counter()
    work = args.work / "pretrain_throughput"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inputs, source = prepare(args, work)
    load_before = os.getloadavg()

    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for vocab in args.vocabs:
            for precision in precisions:
                for arm in (arms if r % 2 == 0 else arms[::-1]):
                    key = f"{vocab}/{precision}/{arm}"
                    res = run_arm(arm.split("_")[0], **inputs[vocab], work=work / f"r{r}-{vocab}-{arm}",
                                  precision=precision, steps=args.steps, warmup=args.warmup, batch=args.batch,
                                  seq=args.seq, compile=arm == "ours_compile")
                    runs.setdefault(key, []).append(res)
                    print(f"[round {r + 1}] {key}: {res['tokens_per_s']:,.0f} tok/s, peak RSS "
                          f"{res['peak_rss_mib']:,.0f} MiB, warm-up {res['warmup_s']:.1f} s", flush=True)
    load_after = os.getloadavg()

    # Best round by tokens/s; peak memory as the largest over the rounds (it barely moves between them).
    best = {key: {"tokens_per_s": max(r["tokens_per_s"] for r in rs),
                  "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                  "rss_start_mib": max(r["rss_start_mib"] for r in rs), "warmup_s": min(r["warmup_s"] for r in rs)}
            for key, rs in runs.items()}
    lines = [f"tiny preset (hidden 256, 4 layers), batch {args.batch} x seq {args.seq}, {args.steps} steps per arm "
             f"(first {args.warmup} not timed), best of {args.rounds} alternating rounds, each arm a fresh process; "
             f"threads {runs[next(iter(runs))][0]['threads']}, CPU bf16 fast path: {bf16_is_fast()}; load average "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs on the machine)", "",
             "| vocab | precision | arm | tokens/s | ours/baseline | peak RSS MiB | ours/baseline | "
             "RSS at start MiB |", "|---|---|---|---|---|---|---|---|"]
    goals = {}
    for vocab in args.vocabs:
        for precision in precisions:
            base = best[f"{vocab}/{precision}/baseline"]
            for arm in arms:
                b = best[f"{vocab}/{precision}/{arm}"]
                speed, mem = b["tokens_per_s"] / base["tokens_per_s"], b["peak_rss_mib"] / base["peak_rss_mib"]
                shown = ("-", "-") if arm == "baseline" else (f"{speed:.2f}x", f"{mem:.2f}x")
                lines.append(f"| {vocab:,} | {precision} | {arm} | {b['tokens_per_s']:,.0f} | {shown[0]} | "
                             f"{b['peak_rss_mib']:,.0f} | {shown[1]} | {b['rss_start_mib']:,.0f} |")
                if arm == "ours":
                    goals[f"{vocab}/{precision}"] = {"speed_ratio": speed, "memory_ratio": mem,
                                                     "speed_1_2x": speed >= 1.2,
                                                     "memory_30pct_less": mem <= 0.7 if vocab == 55_296 else None}
    lines += ["", "Goals: ours >= 1.2x the baseline's tokens/s at the same precision; >= 30% less peak memory at "
              "55,296 pieces."]
    for key, g in goals.items():
        lines.append(f"- {key}: speed {g['speed_ratio']:.2f}x {'PASS' if g['speed_1_2x'] else 'NOT MET'}"
                     + ("" if g["memory_30pct_less"] is None else
                        f"; peak memory {1 - g['memory_ratio']:.0%} less "
                        f"{'PASS' if g['memory_30pct_less'] else 'NOT MET'}"))
    if args.compile:
        lines += ["", "--compile pays back its compile time (the extra warm-up) after this many steps at these sizes:"]
        for vocab in args.vocabs:
            for precision in precisions:
                plain, comp = best[f"{vocab}/{precision}/ours"], best[f"{vocab}/{precision}/ours_compile"]
                tokens = args.batch * args.seq
                saved = tokens / plain["tokens_per_s"] - tokens / comp["tokens_per_s"]  # seconds per step
                extra = comp["warmup_s"] - plain["warmup_s"]
                goals[f"{vocab}/{precision}"]["compile"] = {"extra_warmup_s": extra, "saved_s_per_step": saved}
                lines.append(f"- {vocab}/{precision}: {extra:.0f} s more warm-up, {saved:+.3f} s per step: "
                             + (f"pays back after {extra / saved:,.0f} steps" if saved > 0 else "never pays back"))
    wall = time.perf_counter() - began
    lines.append(f"- text: {source}; wall time {wall:.0f} s")
    payload = {"settings": {"preset": "tiny", "batch": args.batch, "seq_len": args.seq, "steps": args.steps,
                            "warmup": args.warmup, "rounds": args.rounds, "vocabs": args.vocabs,
                            "precisions": precisions, "bf16_fast_path": bf16_is_fast(), "text": source},
               "best": best, "runs": runs, "goals": goals, "load_average": {"before": load_before,
                                                                            "after": load_after}, "wall_s": wall}
    write_results("pretrain_throughput_compile" if args.compile else "pretrain_throughput", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
