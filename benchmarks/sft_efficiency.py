"""SFT efficiency of packing against the seed's one-conversation-per-row batches, on the shared SFT sets.

Ours: `pack_examples` puts several conversations into one row of seq_len tokens (positions restart per
conversation, so transformers keeps them apart without an attention mask); rows go in a seeded random order, B
rows a batch, each batch padded to its longest row. Baseline, as FlagAlpha/Llama2-Chinese's finetune script
does it: one conversation per row in a seeded random order, B rows a batch, padded like
`DataCollatorForSeq2Seq(padding=True, pad_to_multiple_of=8)`, i.e. to the longest row rounded up to a multiple
of 8. Both sides use the same tokenized examples (template `atom`, conversations longer than seq_len lose their
oldest turns), so the only difference is how they are laid out.

1. Useful-token share: real tokens / token slots over every batch of one epoch, per dataset and combined.
2. Speed on the combined data: forward + backward + AdamW step of the tiny model (fp32, SDPA), loss = summed
   token loss / targets. Three sides: ours (packed rows, attention one conversation span at a time, the
   vocabulary projection only at target positions), packed rows with SDPA's block mask and every logit computed
   (to separate packing from the rest), and the seed-style padded batches (every logit, as the seed's model
   computes them). Each side has its own model and optimizer, and the sides alternate
   step by step: on a small shared CPU the speed drifts with whatever else runs, and interleaving spreads that
   drift over all sides alike instead of charging it to whichever ran last. The first steps of each side are
   warm-up and not timed. Useful tok/s counts real tokens only; slot tok/s counts padding too.
3. With CUDA (unless --no-gpu-presets): LoRA (and QLoRA when bitsandbytes imports) tokens/s and peak memory of the 1b
   preset on packed batches.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results

from zhllama.data.conversations import read_conversations
from zhllama.data.readers import ReadReport
from zhllama.data.sft_batches import SftExamples, collate, pack_examples, padded_batch, tokenize_examples
from zhllama.model import init_model
from zhllama.model.loading import load_tokenizer
from zhllama.train.loop import token_loss
from zhllama.train.varlen import register as register_varlen

DATASETS = {"dev_sft": "sft/llama2-chinese/dev_sft.csv",
            "dev_sft_sharegpt": "sft/llama2-chinese/dev_sft_sharegpt.csv",
            "medicalgpt_sharegpt_1k": "sft/medicalgpt/sharegpt_zh_1K_format.jsonl"}
TEMPLATE, PRESET, WARMUP, SEED = "atom", "tiny", 2, 0
# ours (packed rows, per-conversation attention spans, logits at targets only); packed rows with SDPA's block mask
# and every logit; the seed's padded batches.
SIDES = ("packed", "packed_full_logits", "padded")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ceil8(n: int) -> int:
    return -(-n // 8) * 8


def epoch_batches(ex: SftExamples, seq_len: int, batch: int, seed: int = SEED) -> dict:
    """Both sides' batches of one epoch, in their seeded order, as lists of rows (lists of example indices)."""
    rng = np.random.default_rng(seed)
    rows = pack_examples(ex.lengths(), seq_len)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    order = [[int(i)] for i in rng.permutation(len(ex))]
    return {side: [rs[s:s + batch] for s in range(0, len(rs), batch)] for side, rs in (("packed", rows),
                                                                                       ("padded", order))}


def make_batch(ex: SftExamples, side: str, rows: list[list[int]], pad_id: int) -> tuple[dict, int]:
    """The model's batch and its number of real tokens."""
    lens = ex.lengths()
    useful = int(sum(lens[i] for row in rows for i in row))
    if side != "padded":
        return collate(ex, rows, pad_id), useful
    idx = [row[0] for row in rows]
    return padded_batch(ex, idx, pad_id, pad_to=ceil8(int(max(lens[i] for i in idx)))), useful


def share(ex: SftExamples, side: str, batches: list[list[list[int]]]) -> dict:
    """Real tokens over token slots for one epoch of batches, with each side's padding rule."""
    lens = ex.lengths()
    slots = 0
    for rows in batches:
        longest = max(int(sum(lens[i] for i in row)) for row in rows)
        slots += (longest if side == "packed" else ceil8(longest)) * len(rows)
    return {"useful": int(lens.sum()), "slots": slots, "share": float(lens.sum()) / slots,
            "rows": sum(map(len, batches)), "batches": len(batches)}


def merge(parts: list[SftExamples]) -> SftExamples:
    out = SftExamples()
    for p in parts:
        out.input_ids += p.input_ids
        out.labels += p.labels
        for name in ("conversations", "truncated", "dropped_turns", "too_long", "no_target"):
            setattr(out, name, getattr(out, name) + getattr(p, name))
    return out


def train_step(model, opt, batch: dict, sparse_logits: bool = True) -> None:
    loss, n, _ = token_loss(model, batch, sparse_logits=sparse_logits)
    (loss / max(n, 1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def speed(model_dir: Path, ex: SftExamples, epochs: dict, pad_id: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base.config._attn_implementation = "sdpa"
    sides = {}
    for side in SIDES:
        model = copy.deepcopy(base).train()
        if side == "packed":  # what `zhllama train sft` uses: attention one conversation span at a time
            model.config._attn_implementation = register_varlen()
        sides[side] = {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=1e-4),
                       "time": 0.0, "useful": 0, "slots": 0, "step_s": []}
    for step in range(WARMUP + steps):
        for side, s in sides.items():
            rows = epochs["padded" if side == "padded" else "packed"]
            batch, useful = make_batch(ex, side, rows[step % len(rows)], pad_id)
            start = time.perf_counter()
            # Ours projects only the target positions onto the vocabulary; the seed's model computes every logit.
            train_step(s["model"], s["opt"], batch, sparse_logits=side == "packed")
            took = time.perf_counter() - start
            if step >= WARMUP:
                s["time"] += took
                s["useful"] += useful
                s["slots"] += batch["input_ids"].numel()
                s["step_s"].append(round(took, 3))
    return {side: {"useful_tok_s": s["useful"] / s["time"], "slot_tok_s": s["slots"] / s["time"],
                   "useful_tokens": s["useful"], "slots": s["slots"], "seconds": s["time"], "step_s": s["step_s"]}
            for side, s in sides.items()}


def gpu_figures(tok_dir: Path, work: Path, ex: SftExamples, rows: list[list[list[int]]], pad_id: int,
                steps: int) -> dict | None:
    """LoRA / QLoRA tokens/s and peak memory of the 1b preset on packed batches; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from zhllama.train.trainable import nf4_quantization_config

    model_dir = init_model("1b", tok_dir, work / "1b", seed=0)
    modes = ["lora"]
    try:
        import bitsandbytes  # noqa: F401
        modes.append("qlora")
    except ImportError:
        pass
    out = {}
    for mode in modes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if mode == "qlora":
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=nf4_quantization_config(),
                                                         device_map={"": 0})
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda()
        model.config._attn_implementation = "sdpa"
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        tokens, took = 0, 0.0
        for step in range(WARMUP + steps):
            batch, useful = make_batch(ex, "packed", rows[step % len(rows)], pad_id)
            batch = {k: v.cuda() for k, v in batch.items()}
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                train_step(model, opt, batch)
            torch.cuda.synchronize()
            if step >= WARMUP:
                tokens, took = tokens + useful, took + time.perf_counter() - start
        out[mode] = {"useful_tok_s": tokens / took, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
        del model, opt
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    # A tiny-model step over ~4k slots takes 10-16 s on 2 CPU cores (the 55k-vocab lm_head dominates): 6 timed
    # + 2 warm-up steps per side keep the whole run near 5 minutes.
    p.add_argument("--steps", type=int, default=6, help="timed steps per side, after %d warm-up steps" % WARMUP)
    p.add_argument("--gpu-presets", action=argparse.BooleanOptionalAction, default=True,
                   help="LoRA/QLoRA figures for the 1b preset when CUDA is available (default: on)")
    args = p.parse_args()
    start = time.perf_counter()
    work = args.work / "sft_efficiency"
    tok_dir = args.work / "llama2-zh-zh-rank"
    if not (tok_dir / "tokenizer.json").is_file():
        sys.exit(f"{tok_dir} not found: run benchmarks/tokenizer_efficiency.py first (it builds that tokenizer)")
    tok = load_tokenizer(tok_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    parts, report = {}, ReadReport()
    for name, rel in DATASETS.items():
        parts[name] = tokenize_examples(tok, TEMPLATE, read_conversations([args.data / rel], report), args.seq_len,
                                        progress=False)
    parts["combined"] = merge(list(parts.values()))
    table = {}
    for name, ex in parts.items():
        epochs = epoch_batches(ex, args.seq_len, args.batch_size)
        table[name] = {"counts": ex.counts(), **{side: share(ex, side, b) for side, b in epochs.items()}}

    ex = parts["combined"]
    epochs = epoch_batches(ex, args.seq_len, args.batch_size)
    model_dir = init_model(PRESET, tok_dir, work / PRESET, seed=0)
    rates = speed(model_dir, ex, epochs, pad_id, args.steps)
    ratio = rates["packed"]["useful_tok_s"] / rates["padded"]["useful_tok_s"]
    gpu = gpu_figures(tok_dir, work, ex, epochs["packed"], pad_id, args.steps) if args.gpu_presets else None

    share_ok = table["combined"]["packed"]["share"] >= 0.95
    lines = [f"template {TEMPLATE}, seq_len {args.seq_len}, batch {args.batch_size}, tokenizer vocab {len(tok):,}, "
             f"model {PRESET} (fp32, SDPA), threads {torch.get_num_threads()}", "",
             "| dataset | conversations | examples | truncated | skipped too long | tokens | rows / batches packed "
             "| rows / batches padded | useful share packed | useful share padded |", "|---" * 10 + "|"]
    for name, t in table.items():
        c, pk, pd = t["counts"], t["packed"], t["padded"]
        lines.append(f"| {name} | {c['conversations']:,} | {c['examples']:,} | {c['truncated']:,} "
                     f"({c['truncated'] / max(1, c['conversations']):.1%}) | {c['skipped_too_long']:,} | "
                     f"{c['tokens']:,} | {pk['rows']:,} / {pk['batches']:,} | {pd['rows']:,} / {pd['batches']:,} | "
                     f"{pk['share']:.1%} | {pd['share']:.1%} |")
    lines += ["", f"Speed on the combined data, {args.steps} interleaved steps per side after {WARMUP} warm-up:", "",
              "| method | useful tok/s | slot tok/s (incl. padding) | s/step |", "|---|---|---|---|"]
    for side, label in (("packed", "ours (packed, attention per span, logits at targets)"), ("packed_full_logits",
                        "packed, SDPA block mask, every logit"), ("padded", "seed-style (padded, every logit)")):
        r = rates[side]
        lines.append(f"| {label} | {r['useful_tok_s']:,.0f} | {r['slot_tok_s']:,.0f} | "
                     f"{r['seconds'] / args.steps:.2f} |")
    lines += ["", f"- useful-token share of ours >= 95%: {table['combined']['packed']['share']:.1%} "
              f"{'PASS' if share_ok else 'NOT MET'}",
              f"- speed ratio ours/baseline >= 1.5x: {ratio:.2f}x {'PASS' if ratio >= 1.5 else 'NOT MET'}"]
    if gpu is None:
        why = "run with --gpu-presets" if torch.cuda.is_available() else "no CUDA"
        lines.append(f"- GPU figures: skipped ({why})")
    else:
        lines += [f"- 1b {mode} (bf16 autocast, r=16): {g['useful_tok_s']:,.0f} useful tok/s, "
                  f"peak {g['peak_mem_gib']:.1f} GiB" for mode, g in gpu.items()]
    wall = time.perf_counter() - start
    lines.append(f"- wall time: {wall:.0f} s; reader skips: {len(report.skipped)}")
    payload = {"settings": {"seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
                            "warmup": WARMUP, "template": TEMPLATE, "vocab_size": len(tok), "preset": PRESET,
                            "seed": SEED, "threads": torch.get_num_threads()},
               "datasets": table, "speed": rates, "speed_ratio": ratio, "reader_skipped": report.skipped,
               "goals": {"useful_share_95": share_ok, "speed_ratio_1_5": ratio >= 1.5}, "gpu": gpu,
               "wall_s": wall}
    write_results("sft_efficiency", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
