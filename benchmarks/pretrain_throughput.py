"""Training throughput of our loop against the seed's recipe (HF Trainer over run_clm-style `group_texts`
blocks): the same tiny model, the same Chinese text, the same sequence length and batch, in one run.

Both sides skip their first steps (warm-up) and report steady-state tokens/s. Ours runs with its default
precision (`auto`: bf16 autocast where the CPU has AVX512-BF16/AMX or on a GPU, fp32 otherwise) and also
with fp32 forced; the baseline runs with Trainer's defaults (fp32 on CPU), as the seed's script does there.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results

from zhllama import model as zmodel
from zhllama import tokenizer
from zhllama.assets import llama2_vocab_gguf
from zhllama.config import TrainConfig
from zhllama.data.pack import PackedData, pack
from zhllama.runs import read_log
from zhllama.train import pretrain
from zhllama.train.loop import bf16_is_fast

SEQ, BATCH, WARMUP = 256, 8, 3


def baseline_tokens_per_s(model_dir: Path, blocks, steps: int, work: Path) -> float:
    """What pretrain_clm.py does: Trainer over a list of group_texts blocks, labels = input_ids."""
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = torch.tensor(blocks[i], dtype=torch.long)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa")
    args = TrainingArguments(output_dir=str(work / "hf-trainer"), per_device_train_batch_size=BATCH, max_steps=steps,
                             learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1,
                             logging_steps=10, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                             dataloader_drop_last=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=default_data_collator,
            callbacks=[Clock()]).train()
    return (steps - WARMUP) * BATCH * SEQ / (stamps[-1] - stamps[WARMUP - 1])


def ours_tokens_per_s(model_dir: Path, packed: Path, steps: int, work: Path, precision: str) -> float:
    run = work / f"ours-{precision}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(max_steps=steps, batch_size=BATCH, lr=1e-3, warmup_steps=2, save_every=10 ** 9,
                      eval_every=10 ** 9, log_every=1, precision=precision)
    pretrain(model_dir, packed, run, cfg)
    rates = [r["tokens_per_s"] for r in read_log(run) if r["kind"] == "train"][WARMUP:]
    return len(rates) / sum(1 / r for r in rates)  # harmonic mean = total tokens / total time


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--chars", type=int, default=1_500_000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    work = args.work / "pretrain_throughput"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "zh.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        n = 0
        source = args.data / "pretrain_zh" / "peoples_daily_199801.jsonl"
        for line in source.read_text(encoding="utf-8").splitlines(keepends=True):
            fh.write(line)
            n += len(json.loads(line)["text"])
            if n >= args.chars:
                break
    tok = tokenizer.from_gguf(llama2_vocab_gguf(), work / "llama2")
    model_dir = zmodel.init_model("tiny", tok, work / "tiny", seed=0)
    packed = pack(tok, [corpus], SEQ, work / "packed")
    blocks = [PackedData(packed).block(i).tolist() for i in range(len(PackedData(packed)))]

    # Alternate the two sides and keep each one's best round: load from elsewhere on the machine then
    # hurts both alike instead of whichever happened to run during it.
    rounds = {"baseline_hf_trainer_fp32": [], "ours_fp32": []}
    for _ in range(args.rounds):
        rounds["baseline_hf_trainer_fp32"].append(baseline_tokens_per_s(model_dir, blocks, args.steps, work))
        rounds["ours_fp32"].append(ours_tokens_per_s(model_dir, packed, args.steps, work, "fp32"))
    if bf16_is_fast():
        rounds["ours_auto_bf16"] = [ours_tokens_per_s(model_dir, packed, args.steps, work, "auto")]
    results = {name: max(values) for name, values in rounds.items()}
    base = results["baseline_hf_trainer_fp32"]
    lines = [f"tiny preset (h256, 4 layers, vocab 32,000), batch {BATCH} x seq {SEQ}, {args.steps} steps "
             f"(first {WARMUP} skipped); CPU bf16 fast path available: {bf16_is_fast()}; "
             f"threads {torch.get_num_threads()}", "",
             "| trainer | tokens/s | ratio to baseline |", "|---|---|---|"]
    for name, rate in results.items():
        lines.append(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |")
    lines += ["", "Best of {} alternating rounds each. Goal: ours at least 1.2x the baseline on the 2-core CPU."
              .format(args.rounds)]
    payload = {"tokens_per_s": results, "rounds": rounds, "steps": args.steps, "seq_len": SEQ, "batch": BATCH,
               "bf16_fast_path": bf16_is_fast()}
    write_results("pretrain_throughput", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
