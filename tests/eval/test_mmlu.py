"""MMLU multiple choice: the authors' English prompt, " A".." D" scoring, the 57-subject categories, bad input."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.eval.test_mc import favour, letter_id, loaded  # noqa: F401  (loaded is a module fixture)
from tests.test_cli import assert_one_line_error, run_in_process
from zhllama.errors import ZhllamaError
from zhllama.eval.mc import build_prompt, evaluate, run_mc, score_questions
from zhllama.eval.mc_data import Question, SubjectInfo, read_benchmark
from zhllama.eval.mmlu import CATEGORIES, CATEGORY_SUBJECTS, ORIGINAL_DIFFERS

MMLU_LETTERS = (" A", " B", " C", " D")


def mmlu_rows(golds: str, prefix: str = "Question") -> list[list[str]]:
    """Data rows (no header) with questions of different lengths; the options hold commas, so they get quoted."""
    return [[f"{prefix} {i}: what is{' very' * i} long, really?", f"one, {i}", "two", "three", "four", g]
            for i, g in enumerate(golds)]


def write_mmlu_csv(path: Path, data: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(data)
    return path


def mmlu_folder(root: Path, golds: dict[str, str], split: str = "test") -> Path:
    for subject, g in golds.items():
        write_mmlu_csv(root / split / f"{subject}_{split}.csv", mmlu_rows(g))
        write_mmlu_csv(root / "dev" / f"{subject}_dev.csv", mmlu_rows("ABCDA", prefix="Example"))
    return root


def test_two_shot_prompt_is_the_authors_text(tmp_path):
    root = tmp_path / "mmlu"
    write_mmlu_csv(root / "dev" / "high_school_us_history_dev.csv", [
        ["Who wrote the Declaration?\n", "Adams", "Jefferson", "Franklin, B.", "Madison", "B"],
        ["  In which year did the war end? ", "1776", "1781", "1783", "1789", "C"],
        ["Unused third example", "a", "b", "c", "d", "A"]])
    write_mmlu_csv(root / "test" / "high_school_us_history_test.csv",
                   [["Which state joined last?", "Hawaii", "Alaska", "Texas", " Utah", "A"]])
    info, questions, dev = read_benchmark("mmlu", root, "test", 2)
    subject = "high_school_us_history"
    assert info[subject].zh == "high school us history" and info[subject].categories == ("Humanities",)
    prompt = build_prompt("mmlu", info[subject].zh, questions[subject][0], dev[subject][:2])
    assert prompt == (
        "The following are multiple choice questions (with answers) about high school us history.\n\n"
        "Who wrote the Declaration?\nA. Adams\nB. Jefferson\nC. Franklin, B.\nD. Madison\nAnswer: B\n\n"
        "In which year did the war end?\nA. 1776\nB. 1781\nC. 1783\nD. 1789\nAnswer: C\n\n"
        "Which state joined last?\nA. Hawaii\nB. Alaska\nC. Texas\nD.  Utah\nAnswer:")
    assert build_prompt("mmlu", "anatomy", questions[subject][0], []) == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Which state joined last?\nA. Hawaii\nB. Alaska\nC. Texas\nD.  Utah\nAnswer:")
    # The CSV keeps the raw text (the audit JSON's row is the file's row); only the prompt strips the question.
    assert dev[subject][1].question == "  In which year did the war end? " and dev[subject][1].index == 1


def test_the_57_subjects_and_their_categories():
    assert len(CATEGORIES) == 57 and sum(len(s) for s in CATEGORY_SUBJECTS.values()) == 57
    assert {c: len(s) for c, s in CATEGORY_SUBJECTS.items()} == {"STEM": 19, "Humanities": 13,
                                                                 "Social Sciences": 12, "Other": 13}
    assert (CATEGORIES["abstract_algebra"], CATEGORIES["philosophy"], CATEGORIES["sociology"],
            CATEGORIES["virology"], CATEGORIES["anatomy"]) == ("STEM", "Humanities", "Social Sciences", "Other",
                                                               "STEM")
    assert ORIGINAL_DIFFERS == {"anatomy": "Other"}


def test_planted_bias_picks_b_and_scores_are_a_plain_forward_pass(loaded):  # noqa: F811
    """Mirrors the CMMLU test: " B" favoured in the logits must be chosen everywhere, and nothing else moves."""
    model, tok = loaded
    questions = [Question("virology", i, f"Question {i}:{' long' * (3 * i)}?", ("w", "x", "y", "z"), gold, str(i))
                 for i, gold in enumerate("ABBCDB")]
    prompts = [build_prompt("mmlu", "virology", x, questions[:2]) for x in questions]
    # No prompt depends on its own gold letter.
    assert all(build_prompt("mmlu", "virology", Question(x.subject, x.index, x.question, x.options, other, x.id),
                            questions[:2]) == p for x, p in zip(questions, prompts, strict=True) for other in "ABCD")
    scores = score_questions(model, tok, prompts, batch_size=4, progress=False, letters=MMLU_LETTERS)
    for prompt, row in zip(prompts, scores, strict=True):
        ids = [letter_id(tok, prompt, letter) for letter in MMLU_LETTERS]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([tok(prompt).input_ids])).logits[0, -1].float(), -1)
        np.testing.assert_allclose(row, logp[ids].numpy(), atol=1e-4)

    info = {"virology": SubjectInfo("virology", "virology", ("Other",))}
    with favour(model, letter_id(tok, prompts[0], " B")):
        report = evaluate(model, tok, "mmlu", {"virology": questions}, {"virology": []}, 0, info, batch_size=4,
                          progress=False)
    assert {r["predicted"] for r in report["results"]} == {"B"}
    assert report["accuracy"]["micro"] == pytest.approx(3 / 6)
    assert [r["gold"] for r in report["results"]] == list("ABBCDB")
    assert report["method"]["letter_tokens"]["B"] == {"▁B": 6}  # " B" after "Answer:", as lm-eval scores it
    assert report["method"]["letters"] == list(MMLU_LETTERS)


def test_per_category_aggregation_by_hand(loaded, tmp_path):  # noqa: F811
    model, tok = loaded
    golds = {"philosophy": "BBAC", "college_physics": "BB", "abstract_algebra": "AAAB", "sociology": "BA"}
    root = mmlu_folder(tmp_path / "mmlu", golds)
    info, questions, dev = read_benchmark("mmlu", root, "test", 1)
    assert list(info) == ["abstract_algebra", "college_physics", "philosophy", "sociology"]  # categories' order
    with favour(model, letter_id(tok, "Answer:", " B")):
        report = evaluate(model, tok, "mmlu", questions, dev, 1, info, batch_size=3, progress=False)
    assert {s: r["accuracy"] for s, r in report["subjects"].items()} == {
        "abstract_algebra": 0.25, "college_physics": 1.0, "philosophy": 0.5, "sociology": 0.5}
    cat = report["categories"]
    assert list(cat) == ["STEM", "Social Sciences", "Humanities"]
    assert (cat["STEM"]["questions"], cat["STEM"]["correct"]) == (6, 3)
    assert cat["STEM"]["micro"] == pytest.approx(3 / 6) and cat["STEM"]["macro"] == pytest.approx((0.25 + 1) / 2)
    assert (cat["Humanities"]["micro"], cat["Social Sciences"]["micro"]) == (0.5, 0.5)
    assert report["accuracy"]["micro"] == pytest.approx(6 / 12)
    assert report["accuracy"]["macro"] == pytest.approx((0.25 + 1.0 + 0.5 + 0.5) / 4)


def test_cli_mmlu_end_to_end(tiny_zh_model, tmp_path, capsys):
    root = mmlu_folder(tmp_path / "mmlu", {"marketing": "AB", "astronomy": "CDA", "sociology": "D"}, split="val")
    out = tmp_path / "out" / "r.json"
    done = run_in_process(capsys, "eval", "mc", "--model", tiny_zh_model, "--task", "mmlu", "--data-dir", root,
                          "--split", "val", "--shots", "2", "--subjects", "astronomy", "marketing", "--out", out,
                          "--device", "cpu", "--batch-size", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert (report["task"], report["split"], report["shots"], report["questions"]) == ("mmlu", "val", 2, 5)
    assert list(report["subjects"]) == ["astronomy", "marketing"]
    assert list(report["categories"]) == ["STEM", "Other"] and report["accuracy"]["questions"] == 5
    first = report["results"][0]
    assert (first["subject"], first["index"], first["gold"]) == ("astronomy", 0, "C")
    assert first["predicted"] in "ABCD" and len(first["loglik"]) == 4
    prompt = (tmp_path / "out" / "r.prompts" / "astronomy.txt").read_text()
    assert prompt.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n"
                             "Example 0: what is long, really?\nA. one, 0\n")
    assert prompt.endswith("\nAnswer: B\n\nQuestion 0: what is long, really?\nA. one, 0\nB. two\nC. three\n"
                           "D. four\nAnswer:")
    assert (tmp_path / "out" / "r.md").read_text().startswith("## mmlu val, 2-shot: 5 questions")
    assert "| STEM | 1 | 3 |" in done.stdout and not (tmp_path / "out" / "r.submission.json").exists()


def _break(root: Path, case: str) -> list[str]:
    """Damage a good MMLU fixture; the words the one-line message must contain."""
    test = root / "test" / "sociology_test.csv"
    if case == "missing column":
        rows = mmlu_rows("AB")
        write_mmlu_csv(test, [rows[0], rows[1][:3] + rows[1][4:]])
        return [str(test), ":2", "row 1", "5 fields", "expected 6"]
    if case == "bad answer":
        write_mmlu_csv(test, mmlu_rows("ABE"))
        return [str(test), ":3", "row 2", "'E'", "A, B, C, D"]
    if case == "numeric answer":
        write_mmlu_csv(test, mmlu_rows("1"))
        return [str(test), ":1", "row 0", "'1'"]
    if case == "missing dev file":
        (root / "dev" / "marketing_dev.csv").unlink()
        return [str(root / "dev" / "marketing_dev.csv"), "missing"]
    if case == "not an mmlu subject":
        write_mmlu_csv(root / "test" / "cooking_test.csv", mmlu_rows("A"))
        return ["cooking_test.csv", "57 subjects"]
    return [str(root / "val"), "missing"]  # "no split folder"


@pytest.mark.parametrize("case", ["missing column", "bad answer", "numeric answer", "missing dev file",
                                  "not an mmlu subject", "no split folder"])
def test_bad_input_is_one_line_and_writes_nothing(tiny_zh_model, tmp_path, case):
    root = mmlu_folder(tmp_path / "mmlu", {"sociology": "AB", "marketing": "C"})
    words = _break(root, case)
    split = "val" if case == "no split folder" else "test"
    out = tmp_path / "out" / "r.json"
    with pytest.raises(ZhllamaError) as err:
        run_mc(tiny_zh_model, "mmlu", root, split, 1, None, out, device="cpu")
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_bad_row_and_an_unknown_subject(tiny_zh_model, tmp_path, capsys):
    root = mmlu_folder(tmp_path / "mmlu", {"sociology": "AB"})
    bad = write_mmlu_csv(root / "dev" / "sociology_dev.csv", [*mmlu_rows("AB"), ["q", "a", "b", "c", "d", "F"]])
    args = ["eval", "mc", "--model", tiny_zh_model, "--task", "mmlu", "--data-dir", root, "--split", "test",
            "--device", "cpu"]
    done = run_in_process(capsys, *args)
    assert done.returncode == 1
    assert_one_line_error(done, str(bad), ":3", "row 2", "'F'")
    done = run_in_process(capsys, *args, "--subjects", "sociology", "cookery")
    assert done.returncode == 1
    assert_one_line_error(done, "'cookery'", "57 subjects")
