"""Readers for the C-Eval, CMMLU and MMLU folders, exactly as their authors publish them.

C-Eval::

    DIR/subject_mapping.json         {subject: [English name, Chinese name, category]}
    DIR/{dev,val,test}/<subject>_<split>.csv
                                     id,question,A,B,C,D,answer  (+explanation in dev; test has no answer)

CMMLU::

    DIR/subject_mapping.json         {subject: {"zh": name, "subcategories": [...], "categories": [...]}}
    DIR/{dev,test}/<subject>.csv     ,Question,A,B,C,D,Answer    (the first column is an unnamed index)

MMLU (``zhllama.eval.mmlu``: no mapping file, the 57 subjects' categories are in the code)::

    DIR/{dev,val,test}/<subject>_<split>.csv
                                     question,A,B,C,D,answer     (no header)

Every problem is a ZhllamaError of one line that names the file (and the line, for a bad row), raised before
any model is loaded, so a bad folder costs nothing and writes nothing.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import ZhllamaError

LETTERS = ("A", "B", "C", "D")
SPLITS = {"ceval": ("dev", "val", "test"), "cmmlu": ("dev", "test"), "mmlu": ("dev", "val", "test")}
MAX_SHOTS = 5
# Per task: (question column, answer column, id column or None for "the row's position").
COLUMNS = {"ceval": ("question", "answer", "id"), "cmmlu": ("Question", "Answer", None)}


@dataclass(frozen=True)
class Question:
    subject: str                    # the English snake_case subject, e.g. "computer_network"
    index: int                      # 0-based data row in its CSV (the header is not counted)
    question: str
    options: tuple[str, str, str, str]
    answer: str | None              # "A".."D", or None where the split has no public answers
    id: str = ""                    # C-Eval's id column (the key of a test-split submission); else str(index)


@dataclass(frozen=True)
class SubjectInfo:
    name: str                       # snake_case, as in the file names
    zh: str                         # the name the prompt header says: Chinese; MMLU's "abstract algebra"
    categories: tuple[str, ...]     # C-Eval: one; CMMLU: one or two ("China specific" is the second)


def check_task(task: str, split: str | None = None, shots: int | None = None) -> None:
    if task not in SPLITS:
        raise ZhllamaError(f"unknown task {task!r}: choose ceval, cmmlu or mmlu")
    if split is not None and split not in SPLITS[task]:
        raise ZhllamaError(f"{task} has no {split!r} split: choose {' or '.join(SPLITS[task])}")
    if shots is not None and not 0 <= shots <= MAX_SHOTS:
        raise ZhllamaError(f"--shots {shots} is outside 0..{MAX_SHOTS} (the dev split has {MAX_SHOTS} per subject)")


def read_subject_info(task: str, data_dir: str | Path) -> dict[str, SubjectInfo]:
    """Every subject of the benchmark, in the mapping file's order."""
    check_task(task)
    path = Path(data_dir) / "subject_mapping.json"
    if not path.is_file():
        raise ZhllamaError(f"{path} is missing: the {task} folder needs its subject_mapping.json "
                           "(subject names and categories)")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ZhllamaError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(mapping, dict):
        raise ZhllamaError(f"{path}: expected an object of subjects")
    info = {}
    for name, entry in mapping.items():
        try:
            if task == "ceval":
                _english, zh, category = entry
                info[name] = SubjectInfo(name, str(zh), (str(category),))
            else:
                info[name] = SubjectInfo(name, str(entry["zh"]), tuple(str(c) for c in entry["categories"]))
        except (KeyError, TypeError, ValueError):
            want = "[English name, Chinese name, category]" if task == "ceval" else \
                '{"zh": ..., "categories": [...]}'
            raise ZhllamaError(f"{path}: subject {name!r} is not {want}") from None
    return info


def select_subjects(info: dict[str, SubjectInfo], subjects: list[str] | None, data_dir: str | Path) -> list[str]:
    if not subjects:
        return list(info)
    unknown = [s for s in subjects if s not in info]
    if unknown:
        raise ZhllamaError(f"unknown subject(s) {', '.join(unknown)}: not in "
                           f"{Path(data_dir) / 'subject_mapping.json'}")
    return list(dict.fromkeys(subjects))


def subject_csv(task: str, data_dir: str | Path, split: str, subject: str) -> Path:
    name = f"{subject}_{split}.csv" if task == "ceval" else f"{subject}.csv"
    return Path(data_dir) / split / name


def read_questions(task: str, data_dir: str | Path, split: str, subject: str) -> list[Question]:
    """The questions of one subject's CSV; answer is None when the file has no answer column (C-Eval test)."""
    check_task(task, split)
    if task == "mmlu":
        from zhllama.eval import mmlu

        return mmlu.read_questions(data_dir, split, subject)
    path = subject_csv(task, data_dir, split, subject)
    if not path.is_file():
        raise ZhllamaError(f"{path} is missing (subject {subject!r}, split {split!r})")
    question_col, answer_col, id_col = COLUMNS[task]
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ZhllamaError(f"{path} is empty: expected a header row")
        header = [h.strip() for h in header]
        # Only C-Eval's test split lacks answers; a CMMLU or C-Eval dev/val file without them is broken.
        answered = not (task == "ceval" and split == "test")
        needed = [c for c in (id_col, question_col, *LETTERS, answer_col if answered else None) if c]
        missing = [c for c in needed if c not in header]
        if missing:
            raise ZhllamaError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
        col = {name: header.index(name) for name in needed}
        has_answer = answer_col in header
        if has_answer:
            col[answer_col] = header.index(answer_col)
        questions = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # a trailing blank line is not a question
            index = len(questions)
            where = f"{path}:{reader.line_num} (row {index})"
            if len(row) < len(header):
                raise ZhllamaError(f"{where}: {len(row)} fields, the header has {len(header)}")
            answer = row[col[answer_col]].strip() if has_answer else None
            if has_answer and answer not in LETTERS:
                raise ZhllamaError(f"{where}: answer {answer!r} is not one of A, B, C, D")
            questions.append(Question(
                subject=subject, index=index, question=row[col[question_col]],
                options=tuple(row[col[letter]] for letter in LETTERS),
                answer=answer, id=row[col[id_col]].strip() if id_col else str(index)))
    return questions


def read_benchmark(task: str, data_dir: str | Path, split: str, shots: int, subjects: list[str] | None = None):
    """(subject info, questions by subject, dev examples by subject): everything checked before any model loads."""
    check_task(task, split, shots)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ZhllamaError(f"--data-dir {data_dir} is not a folder")
    if task == "mmlu":  # the subjects are the split's files, or the ones asked for
        from zhllama.eval import mmlu

        info = {s: mmlu.subject_info(s) for s in subjects} if subjects else mmlu.read_subject_info(data_dir, split)
    else:
        info = read_subject_info(task, data_dir)
    chosen = select_subjects(info, subjects, data_dir)
    questions = {s: read_questions(task, data_dir, split, s) for s in chosen}
    dev = {s: (questions[s] if split == "dev" else read_questions(task, data_dir, "dev", s)) if shots else []
           for s in chosen}
    return {s: info[s] for s in chosen}, questions, dev
