"""MMLU (Hendrycks et al., ICLR 2021): its folder, its 57 subjects' categories, read exactly as released.

Layout, as the authors publish it (``data.tar``; HF ``cais/mmlu`` holds the same rows)::

    DIR/{dev,val,test}/<subject>_<split>.csv     no header; question,A,B,C,D,answer (answer = A..D)

There is no mapping file: the subjects are the ``<subject>_<split>.csv`` files of the split's folder, each of
which must be one of the 57 below. The prompt (built by ``zhllama.eval.mc.build_prompt``) is the authors'::

    The following are multiple choice questions (with answers) about {subject, "_" -> " "}.\\n\\n
    each example:  {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {gold letter}\\n\\n
    the question:  {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:

with the question text stripped of surrounding whitespace as lm-evaluation-harness's ``mmlu`` task does (1,105
of the 15,858 released questions begin or end with some; the options are kept as they are), and one space after
"about" (the authors' ``format_subject`` gives two, a slip lm-evaluation-harness does not copy). The scored
continuations are " A", " B", " C", " D", as in lm-evaluation-harness.

Categories (STEM, Humanities, Social Sciences, Other): lm-evaluation-harness's ``mmlu_stem``,
``mmlu_humanities``, ``mmlu_social_sciences`` and ``mmlu_other`` groups (its ``tasks/mmlu/_generate_configs.py``),
written out below by category. They are the original repository's ``categories.py`` (subject -> subcategory ->
category) except for one subject: ``anatomy``, whose subcategory "health" puts it in the original's "other
(business, health, misc.)", is STEM in lm-evaluation-harness (``ORIGINAL_DIFFERS`` records it).
"""

from __future__ import annotations

import csv
from pathlib import Path

from zhllama.errors import ZhllamaError
from zhllama.eval.mc_data import LETTERS, Question, SubjectInfo

FIELDS = ("question", *LETTERS, "answer")
CATEGORY_SUBJECTS = {
    "STEM": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning"),
    "Humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions"),
    "Social Sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy"),
    "Other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology"),
}
CATEGORIES = {subject: category for category, subjects in CATEGORY_SUBJECTS.items() for subject in subjects}
ORIGINAL_DIFFERS = {"anatomy": "Other"}  # hendrycks/test categories.py, where lm-eval says STEM


def subject_info(subject: str) -> SubjectInfo:
    """The prompt's name for a subject ("high_school_us_history" -> "high school us history") and its category."""
    if subject not in CATEGORIES:
        raise ZhllamaError(f"{subject!r} is not one of MMLU's 57 subjects (zhllama.eval.mmlu.CATEGORY_SUBJECTS)")
    return SubjectInfo(subject, subject.replace("_", " "), (CATEGORIES[subject],))


def subject_csv(data_dir: str | Path, split: str, subject: str) -> Path:
    return Path(data_dir) / split / f"{subject}_{split}.csv"


def read_subject_info(data_dir: str | Path, split: str) -> dict[str, SubjectInfo]:
    """The subjects that have a file in DIR/<split>/, in the categories' order; any other CSV there is refused."""
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise ZhllamaError(f"{folder} is missing: an MMLU folder has dev/, val/ and test/ of <subject>_<split>.csv")
    suffix = f"_{split}.csv"
    found = {p.name[:-len(suffix)]: p for p in folder.glob(f"*{suffix}")}
    for name, path in sorted(found.items()):
        if name not in CATEGORIES:
            raise ZhllamaError(f"{path}: {name!r} is not one of MMLU's 57 subjects "
                               "(zhllama.eval.mmlu.CATEGORY_SUBJECTS)")
    if not found:
        raise ZhllamaError(f"{folder} has no <subject>{suffix} file")
    return {s: subject_info(s) for s in CATEGORIES if s in found}


def read_questions(data_dir: str | Path, split: str, subject: str) -> list[Question]:
    """One subject's questions; a row without its six fields or with an answer outside A-D is refused."""
    path = subject_csv(data_dir, split, subject)
    if not path.is_file():
        raise ZhllamaError(f"{path} is missing (subject {subject!r}, split {split!r})")
    questions = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # a trailing blank line is not a question
            index = len(questions)
            where = f"{path}:{reader.line_num} (row {index})"
            if len(row) != len(FIELDS):
                raise ZhllamaError(f"{where}: {len(row)} fields, expected {len(FIELDS)} ({','.join(FIELDS)}; "
                                   "MMLU files have no header)")
            answer = row[-1].strip()
            if answer not in LETTERS:
                raise ZhllamaError(f"{where}: answer {answer!r} is not one of A, B, C, D")
            questions.append(Question(subject=subject, index=index, question=row[0], options=tuple(row[1:5]),
                                      answer=answer, id=str(index)))
    if not questions:
        raise ZhllamaError(f"{path} has no questions")
    return questions
