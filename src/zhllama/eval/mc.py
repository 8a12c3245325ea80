"""C-Eval, CMMLU and MMLU: multiple-choice accuracy from the log-likelihood of the answer letter.

Prompt, in each benchmark's authors' own wording (``{科目}`` is the subject's Chinese name)::

    C-Eval header:  以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n
    CMMLU header:   以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n
    each example:   {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{gold letter}\\n\\n
    the question:   {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

MMLU (``zhllama.eval.mmlu``) is the same with "The following are multiple choice questions (with answers) about
{subject}.\\n\\n", "Answer:" for "答案：", the question text stripped, and " A".." D" as the letters (so an
example ends "Answer: B\\n\\n"), as Hendrycks et al. and lm-evaluation-harness's ``mmlu`` task do.

The examples are the first `shots` dev rows of the same subject (on the dev split itself, the question is never
its own example). A prompt longer than the model's context loses examples from the end until it fits; if the
bare question is still too long, its tokens are cut from the left (the BOS token is kept). Both are counted.

Scoring, as lm-evaluation-harness and the C-Eval authors do: the log-probability of each letter as the next
token after the prompt, from one forward pass per prompt (logits at the last prompt position, log_softmax in
fp32). Which tokens a letter is depends on the tokenizer (after "：" Llama's sentencepiece gives "A", not "▁A"),
so a letter's tokens are the ones that tokenizing ``prompt + letter`` adds after the prompt's own tokens; a
letter that becomes several tokens is scored by the sum of their log-probabilities (one extra sequence each).

Outputs of ``--out r.json``, each written whole (temporary file, then rename) and r.json last:
``r.json`` the report (per question: subject, CSV row, four log-likelihoods, chosen and gold letter),
``r.md`` the tables (also printed), ``r.prompts/<subject>.txt`` the exact prompt of each subject's first
question, and for C-Eval's test split ``r.submission.json`` ``{subject: {"<id>": "A", ...}}`` for the C-Eval site.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from zhllama.chat.control import encode_plain
from zhllama.errors import ZhllamaError
from zhllama.eval.mc_data import LETTERS, Question, SubjectInfo, check_task, read_benchmark
from zhllama.scoring import kept_logprobs, pad_id, right_pad


@dataclass(frozen=True)
class Style:
    """How a task words its prompt: header (formatted with the subject's name), answer cue, scored letters."""
    header: str
    cue: str
    letters: tuple[str, ...] = LETTERS  # each letter as it follows the cue; an example's answer is written so too
    strip_question: bool = False


STYLES = {"ceval": Style("以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n", "答案："),
          "cmmlu": Style("以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n", "答案："),
          "mmlu": Style("The following are multiple choice questions (with answers) about {}.\n\n", "Answer:",
                        tuple(" " + letter for letter in LETTERS), strip_question=True)}
CATEGORY_ORDER = ("STEM", "Social Science", "Social Sciences", "Humanities", "Other", "China specific")
METHOD = "next-token log-likelihood of the answer letter after {}"
LETTER_IDS = ("a letter's tokens are those that tokenizing prompt + letter adds after the prompt's tokens; "
              "several tokens are scored by their summed log-probability")
AVERAGES = {"micro": "correct / questions, over all questions pooled",
            "macro": "mean of the per-subject accuracies (each subject counts once, as C-Eval and CMMLU report)"}


def format_question(question: Question, answer: str | None = None, task: str = "ceval") -> str:
    style = STYLES[task]
    text = question.question.strip() if style.strip_question else question.question
    options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, question.options, strict=True))
    tail = f"{style.letters[LETTERS.index(answer)]}\n\n" if answer is not None else ""
    return f"{text}{options}\n{style.cue}{tail}"


def build_prompt(task: str, subject_zh: str, question: Question, examples: list[Question]) -> str:
    check_task(task)
    shots = "".join(format_question(example, example.answer, task) for example in examples)
    return STYLES[task].header.format(subject_zh) + shots + format_question(question, task=task)


@dataclass
class Sequence:
    """One forward pass: its tokens, and which (position, token) log-probs add up to which letter's score."""
    prompt: int
    ids: list[int]
    targets: dict[int, list[tuple[int, int]]]  # letter index -> [(position whose logits predict it, token id)]


@dataclass
class Encoded:
    sequences: list[Sequence] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    letter_tokens: dict[str, Counter] = field(default_factory=lambda: {letter: Counter() for letter in LETTERS})


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_prompts(tokenizer, prompts: list[str], max_len: int | None = None,
                   letters: tuple[str, ...] = LETTERS) -> Encoded:
    """The sequences to score every prompt's four `letters` (as written after the prompt, e.g. " A" for MMLU);
    prompts over `max_len` tokens lose their head."""
    out = Encoded()
    if not prompts:
        return out
    # Questions are data: a "</s>" in one is text, not EOS (encode_plain); BOS is added as the tokenizer says.
    prompt_ids = encode_plain(tokenizer, prompts, add_special_tokens=True)
    letter_ids = [encode_plain(tokenizer, [p + letter for p in prompts], add_special_tokens=True) for letter in letters]
    bos = tokenizer.bos_token_id
    for i, ids in enumerate(prompt_ids):
        withs = [letter_ids[j][i] for j in range(len(LETTERS))]
        # Usually the prompt's tokens are a prefix of prompt + letter; if the letter merged with the prompt's
        # last token, the shared context is shorter and that token is part of every letter's continuation.
        context = ids[:min(common_prefix(ids, w) for w in withs)]
        tails = [w[len(context):] for w in withs]
        for letter, tail in zip(LETTERS, tails, strict=True):
            if not tail:
                raise ZhllamaError(f"the tokenizer adds no token for the answer letter {letter} after prompt {i}")
            out.letter_tokens[letter][" ".join(tokenizer.convert_ids_to_tokens(tail))] += 1
        last = len(context) - 1
        if all(len(tail) == 1 for tail in tails):
            seqs = [Sequence(i, context, {j: [(last, tail[0])] for j, tail in enumerate(tails)})]
        else:
            seqs = [Sequence(i, context + tail[:-1], {j: [(last + k, t) for k, t in enumerate(tail)]})
                    for j, tail in enumerate(tails)]
        cut = 0
        if max_len is not None:
            need = max(len(s.ids) for s in seqs)
            cut = max(0, need - max_len)
            if cut and len(context) - cut < 2:
                raise ZhllamaError(f"prompt {i}: the model's context ({max_len} tokens) cannot hold the answer")
        for s in seqs:
            if cut:
                # Keep BOS where there is one: the model never saw a sequence start without it.
                keep_bos = bool(s.ids) and s.ids[0] == bos
                s.ids = s.ids[:1] + s.ids[1 + cut:] if keep_bos else s.ids[cut:]
                s.targets = {j: [(pos - cut, t) for pos, t in pairs] for j, pairs in s.targets.items()}
            out.sequences.append(s)
        out.truncated.append(cut > 0)
    return out


@torch.no_grad()
def score_encoded(model, encoded: Encoded, n_prompts: int, batch_size: int = 8, pad_id: int = 0,
                  progress: bool = True) -> np.ndarray:
    """(n_prompts, 4) summed letter log-probabilities; sequences go longest first, right-padded, batch_size a go."""
    if batch_size < 1:
        raise ZhllamaError(f"--batch-size {batch_size} must be at least 1")
    scores = np.zeros((n_prompts, len(LETTERS)))
    order = sorted(range(len(encoded.sequences)), key=lambda k: -len(encoded.sequences[k].ids))
    device = next(model.parameters()).device
    model.eval()
    with tqdm(total=len(order), desc="mc", unit="seq", disable=not progress or None, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = [encoded.sequences[k] for k in order[start:start + batch_size]]
            # Right padding leaves every real token at its unpadded position, so position ids need no care.
            inputs = right_pad([seq.ids for seq in batch], pad_id, device=device)
            keep = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
            for row, seq in enumerate(batch):
                for pairs in seq.targets.values():
                    for pos, _ in pairs:
                        keep[row, pos] = True
            # Only the scored positions are projected onto the vocabulary; they come back in (row, position) order.
            logp = kept_logprobs(model, inputs, keep.to(device)).cpu()
            flat = {(int(r), int(p)): n for n, (r, p) in enumerate(keep.nonzero().tolist())}
            for row, seq in enumerate(batch):
                for j, pairs in seq.targets.items():
                    scores[seq.prompt, j] += sum(float(logp[flat[row, pos], tok]) for pos, tok in pairs)
            bar.update(len(batch))
    return scores


def model_max_len(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def pad_token_id(tokenizer) -> int:
    return pad_id(tokenizer)


def score_questions(model, tokenizer, prompts: list[str], batch_size: int = 8, progress: bool = True,
                    letters: tuple[str, ...] = LETTERS) -> np.ndarray:
    """(len(prompts), 4) log-likelihoods of A, B, C, D (written as `letters`) as the answer after each prompt."""
    encoded = encode_prompts(tokenizer, prompts, model_max_len(model), letters)
    return score_encoded(model, encoded, len(prompts), batch_size, pad_token_id(tokenizer), progress)


def fit_prompts(task: str, tokenizer, info: list[SubjectInfo], questions: list[Question],
                examples: list[list[Question]], max_len: int | None) -> tuple[list[str], list[int]]:
    """Each question's prompt with as many of its examples as fit in `max_len` tokens."""
    prompts = [build_prompt(task, i.zh, q, ex) for i, q, ex in zip(info, questions, examples, strict=True)]
    shots = [len(ex) for ex in examples]
    if max_len is None or not prompts:
        return prompts, shots
    lengths = [len(ids) for ids in encode_plain(tokenizer, prompts, add_special_tokens=True)]  # refits are rare
    for n, length in enumerate(lengths):
        while length > max_len and shots[n] > 0:
            shots[n] -= 1
            prompts[n] = build_prompt(task, info[n].zh, questions[n], examples[n][:shots[n]])
            length = len(encode_plain(tokenizer, [prompts[n]], add_special_tokens=True)[0])
    return prompts, shots


def accuracy(correct: int, n: int) -> float | None:
    return correct / n if n else None


def evaluate(model, tokenizer, task: str, questions_by_subject: dict[str, list[Question]],
             dev_by_subject: dict[str, list[Question]], shots: int, subject_info: dict[str, SubjectInfo],
             batch_size: int = 8, progress: bool = True) -> dict:
    """Score every question; the report has per-question results, per-subject and per-category accuracy.

    Accuracy is None everywhere when no question has a gold answer (C-Eval's test split).
    """
    check_task(task, shots=shots)
    max_len = model_max_len(model)
    items, infos, examples = [], [], []
    for subject, questions in questions_by_subject.items():
        if subject not in subject_info:
            raise ZhllamaError(f"subject {subject!r} has no entry in the subject information")
        for q in questions:
            items.append(q)
            infos.append(subject_info[subject])
            # On the dev split a question must not be its own example.
            examples.append([e for e in dev_by_subject.get(subject, []) if e != q and e.answer][:shots])
    prompts, used_shots = fit_prompts(task, tokenizer, infos, items, examples, max_len)
    first_prompts = {}
    for q, prompt in zip(items, prompts, strict=True):
        first_prompts.setdefault(q.subject, prompt)
    encoded = encode_prompts(tokenizer, prompts, max_len, STYLES[task].letters)
    scores = score_encoded(model, encoded, len(prompts), batch_size, pad_token_id(tokenizer), progress)

    per_question, tally = [], {s: [0, 0] for s in questions_by_subject}  # subject -> [correct, answered]
    for q, row in zip(items, scores, strict=True):
        chosen = LETTERS[int(np.argmax(row))]
        per_question.append({"subject": q.subject, "index": q.index, "id": q.id, "loglik": [float(x) for x in row],
                             "predicted": chosen, "gold": q.answer})
        if q.answer is not None:
            tally[q.subject][0] += chosen == q.answer
            tally[q.subject][1] += 1
    answered = any(n for _, n in tally.values())

    subjects = {s: {"zh": subject_info[s].zh, "categories": list(subject_info[s].categories),
                    "questions": len(questions_by_subject[s]), "correct": c if answered else None,
                    "accuracy": accuracy(c, n)} for s, (c, n) in tally.items()}
    names = {c for s in subjects for c in subject_info[s].categories}
    categories = {}
    for cat in [c for c in CATEGORY_ORDER if c in names] + sorted(names - set(CATEGORY_ORDER)):
        members = [s for s in subjects if cat in subject_info[s].categories]
        categories[cat] = summary(members, tally, subjects)
    return {
        "task": task, "shots": shots,
        "method": {"method": METHOD.format(STYLES[task].cue), "letters": list(STYLES[task].letters),
                   "letter_ids": LETTER_IDS,
                   "letter_tokens": {k: dict(v) for k, v in encoded.letter_tokens.items()},
                   "forward": "one forward pass per prompt, right padding with an attention mask, batches sorted "
                              "by length; logits at the last prompt position, log_softmax in fp32",
                   "max_len": max_len},
        "averages": AVERAGES,
        "accuracy": summary(list(subjects), tally, subjects) if answered else None,
        "note": None if answered else "no gold answers in this split: accuracy is not computed",
        "questions": len(items),
        "fewer_shots": sum(k < len(ex) for k, ex in zip(used_shots, examples, strict=True)),
        "truncated": int(sum(encoded.truncated)),
        "categories": categories, "subjects": subjects,
        "first_prompts": first_prompts, "results": per_question,
    }


def summary(members: list[str], tally: dict[str, list[int]], subjects: dict) -> dict:
    correct = sum(tally[s][0] for s in members)
    n = sum(tally[s][1] for s in members)
    accs = [subjects[s]["accuracy"] for s in members if subjects[s]["accuracy"] is not None]
    return {"subjects": len(members), "questions": n, "correct": correct, "micro": accuracy(correct, n),
            "macro": float(np.mean(accs)) if accs else None}


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def markdown(report: dict) -> str:
    head = f"## {report['task']} {report.get('split', '')}, {report['shots']}-shot: {report['questions']} questions"
    lines = [head, ""]
    if report["accuracy"] is None:
        lines += [report["note"], ""]
    else:
        lines += ["| Category | Subjects | Questions | Micro acc % | Macro acc % |", "|---|---:|---:|---:|---:|"]
        for cat, row in [*report["categories"].items(), ("**All**", report["accuracy"])]:
            lines.append(f"| {cat} | {row['subjects']} | {row['questions']} | {pct(row['micro'])} "
                         f"| {pct(row['macro'])} |")
        lines += ["", "Micro: " + AVERAGES["micro"] + ". Macro: " + AVERAGES["macro"] + ".", ""]
    name_column = "In the prompt" if report["task"] == "mmlu" else "科目"
    lines += [f"| Subject | {name_column} | Categories | Questions | Accuracy % |", "|---|---|---|---:|---:|"]
    for name, row in report["subjects"].items():
        lines.append(f"| {name} | {row['zh']} | {', '.join(row['categories'])} | {row['questions']} "
                     f"| {pct(row['accuracy'])} |")
    lines += ["", f"Questions with fewer shots than asked (context too short): {report['fewer_shots']}; "
                  f"left-truncated: {report['truncated']}."]
    return "\n".join(lines)


def submission(report: dict) -> dict[str, dict[str, str]]:
    """C-Eval's test-split submission: {subject: {"<question id>": "A", ...}}."""
    out: dict[str, dict[str, str]] = {s: {} for s in report["subjects"]}
    for r in report["results"]:
        out[r["subject"]][str(r["id"])] = r["predicted"]
    return out


def write_outputs(report: dict, out: str | Path) -> dict[str, Path]:
    """r.prompts/, r.submission.json (C-Eval test), r.md, then r.json: the report lands last, each file whole."""
    from zhllama.artifacts import atomic_output_dir, write_json_atomic, write_provenance, write_text_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    paths = {"prompts": stem.with_name(stem.name + ".prompts"), "markdown": out.with_suffix(".md")}
    with atomic_output_dir(paths["prompts"]) as tmp:
        for subject, prompt in report["first_prompts"].items():
            (tmp / f"{subject}.txt").write_text(prompt, encoding="utf-8")
        write_provenance(tmp, "eval mc prompts", {"report": out.name})
    if report["task"] == "ceval" and report.get("split") == "test":
        paths["submission"] = stem.with_name(stem.name + ".submission.json")
        write_json_atomic(paths["submission"], submission(report), indent=1)
    write_text_atomic(paths["markdown"], markdown(report) + "\n")
    body = {k: v for k, v in report.items() if k != "first_prompts"}
    body["files"] = {k: p.name for k, p in paths.items()}
    write_json_atomic(out, body, indent=1)
    return paths


def run_mc(model_dir, task: str, data_dir, split: str, shots: int, subjects: list[str] | None, out,
           batch_size: int = 8, device: str = "auto", **load_options) -> dict:
    """Read and check the benchmark, load the model, score, print the tables, write `out` (if given).

    ``load_options`` (quantize, rope, rope_factor) go to ``load_checked``."""
    from zhllama.model.loading import load_checked

    check_task(task, split, shots)
    if batch_size < 1:
        raise ZhllamaError(f"--batch-size {batch_size} must be at least 1")
    if out is not None and Path(out).suffix != ".json":
        raise ZhllamaError(f"--out {out} must end in .json (the .md table and .prompts/ go beside it)")
    if task == "ceval" and split == "test" and out is None:
        raise ZhllamaError("C-Eval's test split has no public answers: give --out FILE.json for the submission file")
    info, questions, dev = read_benchmark(task, data_dir, split, shots, subjects)
    model, tokenizer = load_checked(model_dir, device, **load_options)
    report = evaluate(model, tokenizer, task, questions, dev, shots, info, batch_size=batch_size)
    report = {"model": str(model_dir), "data_dir": str(data_dir), "split": split, **report}
    print(markdown(report))
    if out is not None:
        paths = write_outputs(report, out)
        print(f"\nwrote {out} ({', '.join(p.name for p in paths.values())} beside it)")
    return report
