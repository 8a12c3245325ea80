"""`zhllama eval mc` on the real C-Eval (val) and CMMLU (test) folders: speed, and accuracy as a sanity check.

For each benchmark, the first --subjects-limit subjects (at most --questions-per-subject questions each, to keep
a CPU run to minutes) are scored twice with the same model in one run: batched (--batch-size, sequences sorted
by length, right-padded) and unbatched (batch 1). Both are timed after a warm-up and reported as questions/s
and seconds per 1,000 questions, with their ratio. Both sides must give the same predictions; their
log-likelihoods must agree to 1e-3 (padding changes only float rounding).

The default model is a random `tiny` Llama with Llama-2's vocabulary: its accuracy should sit near chance (25%),
which checks that no answer leaks into the prompt and that letters are scored symmetrically. With CUDA, the same
is timed for a random `1b` preset on a CMMLU subset and projected to the full CMMLU test (11,582 questions).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results

from zhllama import tokenizer
from zhllama.assets import llama2_vocab_gguf
from zhllama.eval.mc import evaluate
from zhllama.eval.mc_data import read_benchmark
from zhllama.model import init_model
from zhllama.model.loading import load_checked

SPLITS = {"ceval": "val", "cmmlu": "test"}
CMMLU_TEST_QUESTIONS = 11_582


def random_model(work: Path, preset: str) -> Path:
    out = work / f"random-{preset}"
    if not (out / "config.json").exists():
        tok = tokenizer.from_gguf(llama2_vocab_gguf(), work / "llama2-tokenizer")
        init_model(preset, tok, out, seed=0)
    return out


def subset(task: str, data_dir: Path, shots: int, subjects_limit: int, per_subject: int | None):
    from zhllama.eval.mc_data import read_subject_info

    names = list(read_subject_info(task, data_dir))[:subjects_limit]
    info, questions, dev = read_benchmark(task, data_dir, SPLITS[task], shots, names)
    return info, {s: qs[:per_subject] for s, qs in questions.items()}, dev


def timed(model, tok, task, questions, dev, shots, info, batch_size) -> tuple[dict, float]:
    start = time.perf_counter()
    report = evaluate(model, tok, task, questions, dev, shots, info, batch_size=batch_size, progress=False)
    return report, time.perf_counter() - start


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model folder (default: a random tiny Llama, Llama-2 vocabulary)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--subjects-limit", type=int, default=3, help="first N subjects of each benchmark")
    p.add_argument("--questions-per-subject", type=int, default=40, help="0: all")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    eval_dir = args.data / "eval"
    per_subject = args.questions_per_subject or None
    model_dir = args.model or random_model(args.work / "eval_reference", "tiny")
    model, tok = load_checked(model_dir, args.device)
    device = str(next(model.parameters()).device)

    rows = {}
    for task in SPLITS:
        info, questions, dev = subset(task, eval_dir / task, args.shots, args.subjects_limit, per_subject)
        warm = {s: qs[:2] for s, qs in list(questions.items())[:1]}
        timed(model, tok, task, warm, dev, args.shots, info, args.batch_size)
        batched, t_batched = timed(model, tok, task, questions, dev, args.shots, info, args.batch_size)
        single, t_single = timed(model, tok, task, questions, dev, args.shots, info, 1)
        a = np.array([r["loglik"] for r in batched["results"]])
        b = np.array([r["loglik"] for r in single["results"]])
        n = batched["questions"]
        rows[task] = {
            "split": SPLITS[task], "subjects": list(questions), "questions": n,
            "batched_s": t_batched, "unbatched_s": t_single,
            "batched_q_per_s": n / t_batched, "unbatched_q_per_s": n / t_single,
            "batched_s_per_1k": 1000 * t_batched / n, "unbatched_s_per_1k": 1000 * t_single / n,
            "speedup": t_single / t_batched,
            "max_abs_loglik_diff": float(np.abs(a - b).max()),
            "same_predictions": [r["predicted"] for r in batched["results"]] ==
                                [r["predicted"] for r in single["results"]],
            "accuracy_micro": batched["accuracy"]["micro"], "accuracy_macro": batched["accuracy"]["macro"],
            "fewer_shots": batched["fewer_shots"], "truncated": batched["truncated"],
            "predicted_letters": dict(sorted(
                {x: sum(r["predicted"] == x for r in batched["results"]) for x in "ABCD"}.items())),
        }
        print(f"{task}: {n} questions, batched {t_batched:.1f}s, unbatched {t_single:.1f}s", flush=True)

    projection = None
    if device.startswith("cuda"):
        big, big_tok = load_checked(random_model(args.work / "eval_reference", "1b"), args.device)
        info, questions, dev = subset("cmmlu", eval_dir / "cmmlu", args.shots, 4, 50)
        timed(big, big_tok, "cmmlu", {s: qs[:4] for s, qs in questions.items()}, dev, args.shots, info,
              args.batch_size)
        report, seconds = timed(big, big_tok, "cmmlu", questions, dev, args.shots, info, args.batch_size)
        projection = {"preset": "1b", "questions_timed": report["questions"], "seconds": seconds,
                      "full_cmmlu_test_minutes": seconds / report["questions"] * CMMLU_TEST_QUESTIONS / 60}

    lines = [f"## eval mc reference: {args.shots}-shot, model {'random tiny' if not args.model else model_dir} "
             f"on {device}", "",
             "| Benchmark | Questions | Batch | q/s | s / 1k q | Batch 1 q/s | Batch 1 s / 1k q | Speed-up "
             "| Accuracy micro % | Accuracy macro % | Max loglik diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, r in rows.items():
        lines.append(f"| {task} {r['split']} | {r['questions']} | {args.batch_size} | {r['batched_q_per_s']:.2f} "
                     f"| {r['batched_s_per_1k']:.0f} | {r['unbatched_q_per_s']:.2f} | {r['unbatched_s_per_1k']:.0f} "
                     f"| {r['speedup']:.2f}x | {100 * r['accuracy_micro']:.1f} | {100 * r['accuracy_macro']:.1f} "
                     f"| {r['max_abs_loglik_diff']:.1e} |")
    lines += ["", "Speed-up = unbatched / batched seconds on the same questions, same model, same run. "
              "Micro = over questions; macro = mean over subjects."]
    if not args.model:
        total = sum(r["questions"] for r in rows.values())
        acc = sum(r["accuracy_micro"] * r["questions"] for r in rows.values()) / total
        verdict = "ok" if abs(acc - 0.25) < 3 * np.sqrt(0.25 * 0.75 / total) + 0.05 else "SUSPICIOUS"
        lines.append(f"Sanity check: a random model should score ~25%; it scores {100 * acc:.1f}% over {total} "
                     f"questions ({verdict}). Predicted letters: "
                     + "; ".join(f"{t} {r['predicted_letters']}" for t, r in rows.items()) + ".")
    if projection:
        lines.append(f"Projection, random 1b preset on {device}: {projection['full_cmmlu_test_minutes']:.1f} min "
                     f"for the full CMMLU test ({CMMLU_TEST_QUESTIONS:,} questions, {args.shots}-shot).")
    else:
        lines.append("No CUDA here: no projection for the 1b preset on the full CMMLU test; only the tiny model.")
    write_results("eval_reference", {"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
                                     "results": rows, "projection_1b": projection}, "\n".join(lines))


if __name__ == "__main__":
    main()
