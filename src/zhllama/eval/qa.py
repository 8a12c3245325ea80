"""Open-question evaluation (``zhllama eval qa``): every model answers every question; a judge may score them.

Inputs, told apart by their shape (anything else is an "unknown layout" error):

* AtomBulb ``question.json``: a JSON list of ``{"qid", "question", "first_level_class", "second_level_class"}``;
* our JSONL: one ``{"id", "category", "question"}`` per line (``reference`` optional);
* the BELLE eval set: JSONL of ``{"question", "class", "std_answer"}`` (ids are the 0-based row numbers).

Answers are greedy (temperature 0), so a report is reproducible and two models differ by their weights, not by
luck. A model is an HF folder or a GGUF file: ``zhllama.infer.load_engine`` chooses the engine, and every answer
goes through it and its prompt rule. The questions go to the engine from a pool of threads, so HF's continuous
batching decodes them together (llama.cpp answers them in turn).

The optional judge is any OpenAI-compatible endpoint (``POST {judge_url}/chat/completions``, temperature 0). It
gets ``JUDGE_RUBRIC`` as the system message and the question, the answer (and BELLE's reference answer when
there is one) as the user message. The rubric is ``JUDGE_RUBRIC`` below (also quoted in the README): four
criteria (正确性、相关性、完整性、流畅性), an integer score 0-10, and a two-line reply (理由, 评分).

The score is the last ``评分：N`` in the reply; a reply without one (or outside 0..10) is kept verbatim with score
null, so one confused judge reply does not cost the run. Averages skip null scores.

Output folder (written whole or not at all): ``answers.jsonl`` (one row per question per model), ``report.html``
(by category, one column per model) and ``summary.json`` (per-category average scores when judged).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zhllama.errors import ZhllamaError

JUDGE_RUBRIC = """你是一名严格、公正的中文问答评审。请根据以下标准评价【回答】对【问题】的质量：
1. 正确性：事实、推理和代码是否正确，有无错误或编造；
2. 相关性：是否切题，是否回应了问题的真正要求；
3. 完整性：是否覆盖了问题的要点，有无重要遗漏；
4. 流畅性：中文是否通顺、自然、有条理，有无乱码、重复或中英混杂。
如果提供了【参考答案】，请以它为正确性的依据，但不要求措辞一致。
评分为 0 到 10 的整数：0 表示完全错误、答非所问或无法阅读，5 表示部分正确但有明显缺陷，10 表示正确、完整、流畅。
只输出两行，格式如下：
理由：<一句话说明理由>
评分：<0 到 10 的整数>"""

SCORE_PATTERN = re.compile(r"评分\s*[:：]\s*(\d+(?:\.\d+)?)")
REASON_PATTERN = re.compile(r"理由\s*[:：]\s*(.+)")
GENERATE_THREADS = 8  # enough to fill a batch, few enough that a CPU engine answers each in turn
JUDGE_THREADS = 4
JUDGE_RETRIES = 3  # for 429 and 5xx: rate limits and overloaded judges are routine


@dataclass
class Question:
    id: str
    category: str
    question: str
    reference: str | None = None
    subcategory: str | None = None


# --- reading -----------------------------------------------------------------------------------------------

LAYOUTS = ("AtomBulb question.json (a JSON list of {qid, question, first_level_class}), a JSONL of "
           "{id, category, question}, or the BELLE eval set (JSONL of {question, class, std_answer})")


def read_questions(path: str | Path) -> list[Question]:
    """The questions of any supported layout, normalised; malformed rows raise naming file:line or the index."""
    path = Path(path)
    if not path.is_file():
        raise ZhllamaError(f"question file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        if whole and isinstance(whole[0], dict) and {"qid", "first_level_class"} <= whole[0].keys():
            questions = [_atombulb(path, i, item) for i, item in enumerate(whole)]
        else:
            raise ZhllamaError(f"{path}: unknown layout; expected {LAYOUTS}")
    else:
        questions = _read_jsonl(path, text)
    if not questions:
        raise ZhllamaError(f"{path}: no questions")
    seen: dict[str, str] = {}
    for q, where in zip(questions, _row_names(path, text, whole), strict=True):
        if q.id in seen:
            raise ZhllamaError(f"{where}: duplicate id {q.id!r} (first at {seen[q.id]})")
        seen[q.id] = where
    return questions


def _row_names(path: Path, text: str, whole) -> list[str]:
    if isinstance(whole, list):
        return [f"{path} item {i}" for i in range(len(whole))]
    return [f"{path}:{n}" for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _atombulb(path: Path, index: int, item) -> Question:
    where = f"{path} item {index}"
    _require(where, item, ("qid", "question", "first_level_class"))
    second = item.get("second_level_class")
    return Question(str(item["qid"]), _text(where, item, "first_level_class"), _text(where, item, "question"),
                    subcategory=str(second) if second else None)


def _read_jsonl(path: Path, text: str) -> list[Question]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            if not rows:  # the first row is neither JSON nor JSONL: not a question file at all
                raise ZhllamaError(f"{path}: unknown layout; expected {LAYOUTS}") from None
            raise ZhllamaError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not rows or not isinstance(rows[0][1], dict):
        raise ZhllamaError(f"{path}: unknown layout; expected {LAYOUTS}")
    first = rows[0][1].keys()
    if {"question", "class", "std_answer"} <= first:
        return [_belle(path, number, index, row) for index, (number, row) in enumerate(rows)]
    if {"id", "category", "question"} <= first:
        return [_ours(path, number, row) for number, row in rows]
    raise ZhllamaError(f"{path}: unknown layout; expected {LAYOUTS}")


def _belle(path: Path, number: int, index: int, row) -> Question:
    where = f"{path}:{number}"
    _require(where, row, ("question", "class", "std_answer"))
    return Question(str(index), _text(where, row, "class"), _text(where, row, "question"),
                    reference=_text(where, row, "std_answer", allow_empty=True))


def _ours(path: Path, number: int, row) -> Question:
    where = f"{path}:{number}"
    _require(where, row, ("id", "category", "question"))
    reference = row.get("reference")
    return Question(str(row["id"]), _text(where, row, "category"), _text(where, row, "question"),
                    reference=_text(where, row, "reference", allow_empty=True) if reference is not None else None)


def _require(where: str, row, keys: tuple[str, ...]) -> None:
    if not isinstance(row, dict):
        raise ZhllamaError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        raise ZhllamaError(f"{where}: missing {', '.join(repr(k) for k in missing)}")


def _text(where: str, row: dict, key: str, allow_empty: bool = False) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ZhllamaError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ZhllamaError(f"{where}: {key!r} is empty")
    return value


# --- answering ---------------------------------------------------------------------------------------------

def answer_questions(engine, questions: list[Question], max_tokens: int = 512, source: str = "questions",
                     progress: bool = True) -> list[dict]:
    """Greedy answers from one engine, in question order; all prompts are checked before any is generated."""
    from zhllama.infer import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0).check(engine.max_tokens_limit)
    prompts = []
    for q in questions:
        try:
            prompts.append(engine.encode_chat([{"role": "user", "content": q.question}], params))
        except ZhllamaError as exc:
            raise ZhllamaError(f"{source}: question {q.id}: {exc}") from None

    def answer(i: int) -> dict:
        start = time.perf_counter()
        done = engine.generate(prompts[i], params)
        q = questions[i]
        return {"id": q.id, "category": q.category, "question": q.question, "model": engine.name,
                "answer": done.text, "finish_reason": done.finish_reason, "tokens": done.completion_tokens,
                "seconds": round(time.perf_counter() - start, 3),
                **({"reference": q.reference} if q.reference is not None else {})}

    rows: list[dict | None] = [None] * len(questions)
    with ThreadPoolExecutor(GENERATE_THREADS) as pool:
        futures = {pool.submit(answer, i): i for i in range(len(questions))}
        for future in tqdm(as_completed(futures), total=len(futures), desc=engine.name, disable=not progress or None):
            rows[futures[future]] = future.result()
    return rows


# --- judging -----------------------------------------------------------------------------------------------

def judge_prompt(question: str, answer: str, reference: str | None = None) -> str:
    parts = [f"【问题】\n{question}"]
    if reference:
        parts.append(f"【参考答案】\n{reference}")
    parts.append(f"【回答】\n{answer if answer.strip() else '（空）'}")
    return "\n\n".join(parts)


def parse_judgement(reply: str) -> tuple[float | None, str | None]:
    """(score in 0..10 or None, reason or None) from a judge's reply."""
    scores = SCORE_PATTERN.findall(reply)
    score = float(scores[-1]) if scores else None
    if score is not None and not 0 <= score <= 10:
        score = None
    reason = REASON_PATTERN.search(reply)
    return (int(score) if score is not None and score.is_integer() else score), (
        reason.group(1).strip() if reason else None)


def ask_judge(judge_url: str, judge_model: str, api_key: str | None, content: str, timeout: float = 120) -> str:
    """The judge's reply text; a refused or unreachable judge is a one-line error naming the URL."""
    url = judge_url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": judge_model, "temperature": 0, "messages": [
        {"role": "system", "content": JUDGE_RUBRIC}, {"role": "user", "content": content}]}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    for attempt in range(JUDGE_RETRIES + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as response:
                payload = json.loads(response.read())
            break
        except urllib.error.HTTPError as exc:
            if (exc.code == 429 or exc.code >= 500) and attempt < JUDGE_RETRIES:
                time.sleep(2 ** attempt)
                continue
            detail = exc.read().decode("utf-8", "replace").strip().replace("\n", " ")[:200]
            raise ZhllamaError(f"judge {url} answered HTTP {exc.code}{': ' + detail if detail else ''}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if attempt < JUDGE_RETRIES:
                time.sleep(2 ** attempt)
                continue
            raise ZhllamaError(f"cannot reach judge {url} ({getattr(exc, 'reason', exc)})") from None
        except json.JSONDecodeError:
            raise ZhllamaError(f"judge {url} did not answer JSON") from None
    try:
        return payload["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise ZhllamaError(f"judge {url} answered without choices[0].message.content") from None


def judge_rows(rows: list[dict], judge_url: str, judge_model: str, api_key: str | None = None,
               progress: bool = True) -> None:
    """Add judge_score, judge_reason and judge_reply to every answer row, in place."""

    def judge(row: dict) -> None:
        reply = ask_judge(judge_url, judge_model, api_key,
                          judge_prompt(row["question"], row["answer"], row.get("reference")))
        row["judge_score"], row["judge_reason"] = parse_judgement(reply)
        row["judge_reply"] = reply

    with ThreadPoolExecutor(JUDGE_THREADS) as pool:
        futures = [pool.submit(judge, row) for row in rows]
        for future in tqdm(as_completed(futures), total=len(futures), desc="judge", disable=not progress or None):
            future.result()


def score_summary(rows: list[dict], models: list[str]) -> dict:
    """{model: {"categories": {category: {mean, scored, unscored}}, "overall": {...}}}; means skip null scores."""
    summary = {}
    for model in models:
        by_category: dict[str, list] = defaultdict(list)
        for row in rows:
            if row["model"] == model:
                by_category[row["category"]].append(row.get("judge_score"))
        everything = [s for scores in by_category.values() for s in scores]
        summary[model] = {"categories": {c: _mean(s) for c, s in by_category.items()}, "overall": _mean(everything)}
    return summary


def _mean(scores: list) -> dict:
    scored = [s for s in scores if s is not None]
    return {"mean": round(sum(scored) / len(scored), 3) if scored else None, "scored": len(scored),
            "unscored": len(scores) - len(scored)}


# --- the command -------------------------------------------------------------------------------------------

def model_names(model_dirs: list[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the models apart (run-sft/final, run-pretrain/final);
    the same folder twice, a fair self-comparison, is told apart by a number."""
    parts = [Path(folder).parts or Path(folder).resolve().parts for folder in model_dirs]
    depth = 1
    while depth < max(map(len, parts)) and len({p[-depth:] for p in parts}) < len({p for p in parts}):
        depth += 1
    names: list[str] = []
    for p in parts:
        name = base = "/".join(p[-depth:])
        n = 2
        while name in names:
            name, n = f"{base} ({n})", n + 1
        names.append(name)
    return names


def run_qa(model_dirs: list[Path], questions: Path, out: Path, template: str | None = None,
           judge_url: str | None = None, judge_model: str | None = None, judge_api_key: str | None = None,
           max_tokens: int = 512, limit: int | None = None, device: str = "auto", progress: bool = True,
           **load_options) -> dict:
    """Answer (and optionally judge) the question file with every model (HF folders or GGUF files; ``load_options``
    go to ``zhllama.infer.load_engine``); write answers, report and summary."""
    from zhllama.artifacts import atomic_output_dir, file_sha256, write_provenance
    from zhllama.eval.qa_report import render_report

    if (judge_url is None) != (judge_model is None):
        raise ZhllamaError("--judge-url and --judge-model go together")
    if limit is not None and limit < 1:
        raise ZhllamaError(f"--limit must be at least 1, got {limit}")
    if not model_dirs:
        raise ZhllamaError("give at least one --model")
    asked = read_questions(questions)[:limit]
    names = model_names([Path(m) for m in model_dirs])
    if judge_url is not None:
        # One question to the judge first: a wrong URL or key must fail before the answers are generated, not after.
        ask_judge(judge_url, judge_model, judge_api_key, "【问题】1+1 等于几？\n【回答】2")
    from zhllama.infer import load_engine  # torch loads only once the inputs are known to be good

    rows: list[dict] = []
    for model_dir, name in zip(model_dirs, names, strict=True):
        engine = load_engine(model_dir, template, device=device, name=name, **load_options)
        try:
            rows += answer_questions(engine, asked, max_tokens, source=str(questions), progress=progress)
        finally:
            engine.close()
    judged = judge_url is not None
    if judged:
        judge_rows(rows, judge_url, judge_model, judge_api_key, progress=progress)
    summary = {"questions": str(questions), "n": len(asked), "models": dict(zip(names, map(str, model_dirs),
                                                                                strict=True)),
               "judge": {"url": judge_url, "model": judge_model, "rubric": JUDGE_RUBRIC} if judged else None,
               "scores": score_summary(rows, names) if judged else None}
    with atomic_output_dir(out) as tmp:
        with open(tmp / "answers.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(render_report(asked, rows, names, summary, source=Path(questions).name),
                                         encoding="utf-8")
        write_provenance(tmp, "eval qa", {"models": [str(m) for m in model_dirs], "questions": questions,
                                          "template": template, "judge_url": judge_url, "judge_model": judge_model,
                                          "max_tokens": max_tokens, "limit": limit},
                         inputs={str(questions): file_sha256(questions)})
    print(f"wrote {len(rows)} answers ({len(asked)} questions x {len(names)} models) to {out}")
    if judged:
        for name in names:
            print(f"  {name}: mean judge score {summary['scores'][name]['overall']['mean']}")
    return summary
