"""`zhllama eval mc --task mmlu` against lm-evaluation-harness's `mmlu` task: same model, same prompts, same choices?

By hand, never a dependency: lm-eval is imported from --lmeval-path (e.g. after
`pip install --target /tmp/lmeval lm-eval==0.4.13` plus its datasets/evaluate/... requirements there), offline.

Both score the same MMLU subjects of the shared folder (real CSVs, --split, --shots dev examples, the first
--questions-per-subject questions of each subject) with the same local model folder, on CPU in fp32:
- zhllama: `zhllama.eval.mc.evaluate(task="mmlu")`, batched as `eval mc` does;
- lm-eval: `simple_evaluate(model="hf", ...)` on one task per subject that `include`s lm-eval's own
  `tasks/mmlu/default/_default_template_yaml` (its doc_to_text, choices, first_n few-shot sampler, description),
  with the data swapped for JSON Lines written here from the same CSVs in cais/mmlu's schema
  (question, subject, choices, answer index), since the hub copy cannot be fetched offline.

Reported: agreement of the predicted letters (the issue asks for >= 99%), agreement of the full letter ranking,
the largest |log-likelihood difference| over all 4 letters of all questions, how many lm-eval contexts are
character for character zhllama's prompt, and each side's letter counts (a random model mostly prefers one
letter, so agreement of the choices alone says little; the log-likelihoods say whether the two compute the same).

The default model is a random `tiny` Llama with Llama-2's vocabulary (as benchmarks/eval_reference.py makes it).
Such a model answers one letter almost always; --sharpen F also checks a copy whose attention and MLP weights
are multiplied by F, which makes its letter depend on the question (still random, not knowledgeable).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results
from eval_reference import random_model

from zhllama.eval.mc import build_prompt, evaluate
from zhllama.eval.mc_data import LETTERS, read_benchmark
from zhllama.model.loading import load_checked

SUBJECTS = ("abstract_algebra", "anatomy", "college_physics", "high_school_geography", "philosophy",
            "professional_accounting")


def sharpened(model_dir: Path, factor: float, out: Path) -> Path:
    """A copy of the model with every attention and MLP matrix times `factor`: its choices vary by question."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    if not (out / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("proj.weight"):
                    param.mul_(factor)
        model.save_pretrained(out)
        for f in model_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, out / f.name)
    return out


def lmeval_tasks(work: Path, lm_eval_dir: Path, info: dict, questions: dict, dev: dict) -> dict[str, str]:
    """One lm-eval task YAML per subject over JSON Lines of the same rows; {subject: task name}."""
    data, tasks = work / "data", work / "tasks"
    data.mkdir(parents=True, exist_ok=True)
    tasks.mkdir(parents=True, exist_ok=True)
    template = lm_eval_dir / "tasks" / "mmlu" / "default" / "_default_template_yaml"
    names = {}
    for subject in questions:
        files = {}
        for split, rows in (("test", questions[subject]), ("dev", dev[subject])):
            files[split] = data / f"{subject}_{split}.jsonl"
            files[split].write_text("".join(json.dumps({"question": q.question, "subject": subject,
                                                        "choices": list(q.options),
                                                        "answer": LETTERS.index(q.answer)}) + "\n" for q in rows))
        names[subject] = f"zhllama_check_mmlu_{subject}"
        config = {"include": str(template), "task": names[subject], "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                  "test_split": "test", "fewshot_split": "dev",
                  "description": f"The following are multiple choice questions (with answers) about "
                                 f"{info[subject].zh}.\n\n"}
        (tasks / f"{names[subject]}.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    return names


def run_lmeval(lmeval_path: Path, model_dir: Path, work: Path, info, questions, dev, shots: int,
               batch_size: int) -> tuple[dict, dict]:
    """{subject: [(lm-eval context, [4 log-likelihoods])] in doc order}, and what ran."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    sys.path.insert(0, str(lmeval_path))
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = lmeval_tasks(work, Path(lm_eval.__file__).parent, info, questions, dev)
    manager = TaskManager(include_path=str(work / "tasks"))
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=list(names.values()), num_fewshot=shots, batch_size=batch_size,
                                  device="cpu", log_samples=True, task_manager=manager)
    seconds = time.perf_counter() - start
    per_subject = {}
    for subject, name in names.items():
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        per_subject[subject] = [(s["arguments"][0][0], [float(r[0]) for r in s["filtered_resps"]])
                                for s in samples]
    meta = {"version": getattr(lm_eval, "__version__", "?"), "seconds": round(seconds, 1),
            "model_args": f"pretrained={model_dir},dtype=float32", "tasks": list(names.values()),
            "continuations": [s["arguments"][i][1] for i in range(4)
                              for s in out["samples"][names[next(iter(names))]][:1]],
            "accuracy": {s: out["results"][n].get("acc,none") for s, n in names.items()}}
    return per_subject, meta


def compare(model_dir: Path, args, info, questions, dev, work: Path) -> tuple[dict, str]:
    """Score with both on one model; the results and their Markdown."""
    model, tok = load_checked(model_dir, "cpu")
    start = time.perf_counter()
    report = evaluate(model, tok, "mmlu", questions, dev, args.shots, info, batch_size=args.batch_size,
                      progress=False)
    ours_seconds = time.perf_counter() - start
    theirs, meta = run_lmeval(args.lmeval_path, model_dir, work, info, questions, dev, args.shots, args.batch_size)

    rows = {s: iter(theirs[s]) for s in theirs}
    same_choice = same_ranking = same_prompt = 0
    worst, disagreements = 0.0, []
    counts = {"zhllama": dict.fromkeys(LETTERS, 0), "lm-eval": dict.fromkeys(LETTERS, 0)}
    for r in report["results"]:
        context, loglik = next(rows[r["subject"]])
        q = questions[r["subject"]][r["index"]]
        prompt = build_prompt("mmlu", info[r["subject"]].zh, q, dev[r["subject"]][:args.shots])
        same_prompt += context == prompt
        theirs_letter = LETTERS[int(np.argmax(loglik))]
        counts["zhllama"][r["predicted"]] += 1
        counts["lm-eval"][theirs_letter] += 1
        same_choice += theirs_letter == r["predicted"]
        same_ranking += list(np.argsort(loglik)) == list(np.argsort(r["loglik"]))
        worst = max(worst, float(np.abs(np.array(loglik) - np.array(r["loglik"])).max()))
        if theirs_letter != r["predicted"]:
            disagreements.append({"subject": r["subject"], "index": r["index"], "zhllama": r["loglik"],
                                  "lm-eval": loglik})
    n = len(report["results"])
    payload = {"model": str(model_dir), "split": args.split, "shots": args.shots, "subjects": list(questions),
               "questions": n, "agreement": same_choice / n, "ranking_agreement": same_ranking / n,
               "max_abs_loglik_diff": worst, "identical_prompts": same_prompt,
               "letter_tokens": report["method"]["letter_tokens"], "predicted_letters": counts,
               "zhllama": {"seconds": round(ours_seconds, 1), "accuracy": report["accuracy"]["micro"],
                           "fewer_shots": report["fewer_shots"], "truncated": report["truncated"]},
               "lm_eval": meta, "disagreements": disagreements}
    md = [f"## zhllama `eval mc --task mmlu` vs lm-evaluation-harness {meta['version']} `mmlu`",
          "", f"Model: {model_dir} (fp32, CPU). MMLU {args.split}, {args.shots}-shot, {n} questions "
              f"({args.questions_per_subject or 'all'} per subject) of: {', '.join(questions)}.", "",
          "| Check | Result |", "|---|---|",
          f"| same predicted letter | {same_choice}/{n} = {100 * same_choice / n:.2f}% |",
          f"| same ranking of all four letters | {same_ranking}/{n} = {100 * same_ranking / n:.2f}% |",
          f"| largest \\|log-likelihood difference\\| (4 letters x {n}) | {worst:.2e} |",
          f"| lm-eval context == zhllama prompt, character for character | {same_prompt}/{n} |",
          f"| scored continuations | zhllama {list(report['method']['letters'])} as tokens "
          f"{ {k: list(v) for k, v in report['method']['letter_tokens'].items()} }; lm-eval {meta['continuations']} |",
          f"| predicted letters | zhllama {counts['zhllama']}; lm-eval {counts['lm-eval']} |",
          f"| time | zhllama {ours_seconds:.1f} s; lm-eval {meta['seconds']} s |"]
    return payload, "\n".join(md)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model folder (default: a random tiny Llama, Llama-2 vocabulary)")
    p.add_argument("--lmeval-path", type=Path, default=Path("/tmp/lmeval"), help="where lm-eval was installed")
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS))
    p.add_argument("--split", default="test")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--questions-per-subject", type=int, default=60, help="0: all")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sharpen", type=float, default=4.0, help="also check the model with weights times F (0: no)")
    args = p.parse_args()
    work = args.work / "mmlu_reference"
    model_dir = args.model or random_model(args.work / "eval_reference", "tiny")
    info, questions, dev = read_benchmark("mmlu", args.data / "eval" / "mmlu", args.split, args.shots, args.subjects)
    if args.questions_per_subject:
        questions = {s: qs[:args.questions_per_subject] for s, qs in questions.items()}
    models = [model_dir] + ([sharpened(model_dir, args.sharpen, work / f"sharpened-x{args.sharpen:g}")]
                            if args.sharpen else [])
    runs = [compare(m, args, info, questions, dev, work) for m in models]
    total = sum(r["questions"] for r, _ in runs)
    agree = sum(round(r["agreement"] * r["questions"]) for r, _ in runs)
    head = f"Overall: same predicted letter on {agree}/{total} = {100 * agree / total:.2f}% of (model, question) pairs."
    write_results("mmlu_reference", {"agreement": agree / total, "pairs": total, "runs": [r for r, _ in runs]},
                  "\n\n".join([head, *(m for _, m in runs)]))


if __name__ == "__main__":
    main()
