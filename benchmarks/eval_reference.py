"""`zhllama eval mc` on the real C-Eval (val) and CMMLU (test) folders: speed, and checks that the scores are right.

For each benchmark, the first --subjects-limit subjects (at most --questions-per-subject questions each, to keep
a CPU run to minutes) are scored twice with the same model in one run: batched (--batch-size, sequences sorted
by length, right-padded) and unbatched (batch 1). Both are timed after a warm-up and reported as questions/s
and seconds per 1,000 questions, with their ratio.

Checks (each printed as ok or FAIL; any FAIL exits with status 1):
- batched = unbatched: the same predicted letter for every question, log-likelihoods within 1e-3 (padding may
  change only float rounding);
- the scores are what they claim to be: for the first question of every subject, an independent plain forward
  pass over the exact prompt (no batching, padding or logits_to_keep) gives the four log-likelihoods as the
  log-softmax of each letter's token at the last prompt position, within 1e-4; the four letters are four
  distinct single tokens, so every letter is scored at the same position in the same way;
- no answer in the prompt: every question's prompt is the same string whatever its gold letter is;
- with the default random model only: its hits are chance, i.e. its accuracy is what its own letter preference
  and the gold letters give by chance (sum over letters of predicted share x gold share, within 3 standard
  errors). A random model mostly prefers one letter whatever the question, so its raw accuracy is the gold share
  of that letter and says nothing by itself; the letter counts are printed.

The default model is a random `tiny` Llama with Llama-2's vocabulary. With CUDA, the same is timed for a random
`1b` preset on a CMMLU subset and projected to the full CMMLU test (11,582 questions).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results

from zhllama import tokenizer
from zhllama.assets import llama2_vocab_gguf
from zhllama.eval.mc import build_prompt, evaluate
from zhllama.eval.mc_data import LETTERS, read_benchmark
from zhllama.model import init_model
from zhllama.model.loading import load_checked

SPLITS = {"ceval": "val", "cmmlu": "test"}
CMMLU_TEST_QUESTIONS = 11_582
BATCH_TOLERANCE = 1e-3  # batched vs unbatched log-likelihoods
DIRECT_TOLERANCE = 1e-4  # evaluate() vs a plain forward pass over the same prompt


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


def examples_for(question, dev, shots: int) -> list:
    """The dev examples evaluate() puts before `question` (before any refit to the context length)."""
    return [e for e in dev.get(question.subject, []) if e != question and e.answer][:shots]


def answer_leaks(task: str, info: dict, questions: dict, dev: dict, shots: int) -> list[str]:
    """Questions whose prompt changes with their gold letter (the prompt must not contain the answer)."""
    leaks = []
    for subject, qs in questions.items():
        for q in qs:
            variants = {build_prompt(task, info[subject].zh, dataclasses.replace(q, answer=x),
                                     examples_for(q, dev, shots)) for x in (*LETTERS, None)}
            if len(variants) != 1:
                leaks.append(f"{subject}/{q.index}")
    return leaks


@torch.no_grad()
def direct_scores(model, tok, report: dict) -> tuple[float, list[str]]:
    """Max |loglik difference| between evaluate() and a plain forward pass, over every subject's first question
    (whose exact prompt the report keeps), and any problem with the letters' tokens."""
    problems, worst = [], 0.0
    device = next(model.parameters()).device
    for subject, prompt in report["first_prompts"].items():
        row = next(r for r in report["results"] if r["subject"] == subject)
        ids = tok(prompt).input_ids
        letter_tokens = []
        for letter in LETTERS:
            with_letter = tok(prompt + letter).input_ids
            if with_letter[:-1] != ids:
                problems.append(f"{subject}: {letter!r} is not one token appended to the prompt's tokens")
            letter_tokens.append(with_letter[-1])
        if len(set(letter_tokens)) != len(LETTERS):
            problems.append(f"{subject}: the letters share tokens {letter_tokens}")
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        worst = max(worst, float(np.abs(logp[letter_tokens] - np.array(row["loglik"])).max()))
    return worst, problems


def chance_check(batched: dict) -> dict:
    """A model that knows nothing hits by chance: expected accuracy = sum over letters of its predicted share x
    the gold share, whatever its letter preference; the observed accuracy must lie within 3 standard errors."""
    results = [r for r in batched["results"] if r["gold"] is not None]
    n = len(results)
    predicted = np.array([sum(r["predicted"] == x for r in results) for x in LETTERS]) / n
    gold = np.array([sum(r["gold"] == x for r in results) for x in LETTERS]) / n
    expected = float(predicted @ gold)
    observed = sum(r["predicted"] == r["gold"] for r in results) / n
    se = float(np.sqrt(max(expected * (1 - expected), 1e-12) / n))
    return {"observed": observed, "expected": expected, "se": se, "ok": abs(observed - expected) <= 3 * se + 1e-9,
            "gold_letters": dict(zip(LETTERS, (gold * n).round().astype(int).tolist(), strict=True))}


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
        direct_diff, letter_problems = direct_scores(model, tok, batched)
        leaks = answer_leaks(task, info, questions, dev, args.shots)
        same = [r["predicted"] for r in batched["results"]] == [r["predicted"] for r in single["results"]]
        checks = {
            "batched = unbatched": {
                "ok": same and float(np.abs(a - b).max()) <= BATCH_TOLERANCE,
                "detail": f"same predictions: {same}; max |loglik diff| {np.abs(a - b).max():.1e} "
                          f"(limit {BATCH_TOLERANCE:.0e})"},
            "scores = plain forward pass": {
                "ok": not letter_problems and direct_diff <= DIRECT_TOLERANCE,
                "detail": f"{len(batched['first_prompts'])} prompts, max |loglik diff| {direct_diff:.1e} (limit "
                          f"{DIRECT_TOLERANCE:.0e}); letters are 4 distinct single tokens: {not letter_problems}"
                          + (f" ({'; '.join(letter_problems[:2])})" if letter_problems else "")},
            "no answer in the prompt": {
                "ok": not leaks,
                "detail": f"{n - len(leaks)}/{n} prompts identical whatever the gold letter"
                          + (f" (differ: {', '.join(leaks[:3])})" if leaks else "")},
        }
        if not args.model:
            chance = chance_check(batched)
            checks["random model hits by chance"] = {
                "ok": chance["ok"],
                "detail": f"accuracy {chance['observed']:.1%}, chance given its letter preference "
                          f"{chance['expected']:.1%} +- {chance['se']:.1%}; gold letters {chance['gold_letters']}"}
        rows[task] = {
            "split": SPLITS[task], "subjects": list(questions), "questions": n,
            "batched_s": t_batched, "unbatched_s": t_single,
            "batched_q_per_s": n / t_batched, "unbatched_q_per_s": n / t_single,
            "batched_s_per_1k": 1000 * t_batched / n, "unbatched_s_per_1k": 1000 * t_single / n,
            "speedup": t_single / t_batched,
            "max_abs_loglik_diff": float(np.abs(a - b).max()),
            "same_predictions": same, "max_abs_loglik_diff_direct": direct_diff,
            "accuracy_micro": batched["accuracy"]["micro"], "accuracy_macro": batched["accuracy"]["macro"],
            "fewer_shots": batched["fewer_shots"], "truncated": batched["truncated"],
            "predicted_letters": dict(sorted(
                {x: sum(r["predicted"] == x for r in batched["results"]) for x in "ABCD"}.items())),
            "checks": checks,
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
    lines += ["", "| Benchmark | Check | Result | Detail |", "|---|---|---|---|"]
    for task, r in rows.items():
        for name, check in r["checks"].items():
            lines.append(f"| {task} | {name} | {'ok' if check['ok'] else '**FAIL**'} | {check['detail']} |")
    lines.append("")
    lines.append("Predicted letters: " + "; ".join(f"{t} {r['predicted_letters']}" for t, r in rows.items()) + ". "
                 + ("A random model prefers some letters whatever the question, so its accuracy is the gold share of "
                    "those letters: it checks nothing by itself; the chance check above compares it with that share."
                    if not args.model else ""))
    if projection:
        lines.append(f"Projection, random 1b preset on {device}: {projection['full_cmmlu_test_minutes']:.1f} min "
                     f"for the full CMMLU test ({CMMLU_TEST_QUESTIONS:,} questions, {args.shots}-shot).")
    else:
        lines.append("No CUDA here: no projection for the 1b preset on the full CMMLU test; only the tiny model.")
    write_results("eval_reference", {"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
                                     "results": rows, "projection_1b": projection}, "\n".join(lines))
    failed = [f"{task}: {name}" for task, r in rows.items() for name, c in r["checks"].items() if not c["ok"]]
    if failed:
        raise SystemExit(f"FAILED: {'; '.join(failed)}")
    print("all checks ok")


if __name__ == "__main__":
    main()
