"""C-Eval / CMMLU multiple choice: exact prompts, letter log-likelihoods, aggregation, outputs and bad input."""

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from zhllama.errors import ZhllamaError
from zhllama.eval.mc import build_prompt, encode_prompts, evaluate, run_mc, score_questions
from zhllama.eval.mc_data import Question, SubjectInfo, read_benchmark
from zhllama.model.loading import load_checked, load_tokenizer

CEVAL_HEADER = "id,question,A,B,C,D,answer"
CMMLU_HEADER = ",Question,A,B,C,D,Answer"


def q(index, text, answer="A", subject="s"):
    return Question(subject, index, text, (f"{text}甲", f"{text}乙", "丙", "丁"), answer, str(index))


def rows(golds, prefix="问题"):
    """CSV data rows (index, question, four options, gold) with questions of different lengths."""
    return [[str(i), prefix + "很长" * i + f"第{i}题是什么？", "选项一", "选项二", "选项三", "选项四", g]
            for i, g in enumerate(golds)]


def write_csv(path: Path, header: str, data: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(",".join(r) for r in data)]) + "\n", encoding="utf-8")
    return path


def cmmlu_folder(root: Path, golds: dict[str, list[str]], categories: dict[str, list[str]]) -> Path:
    mapping = {s: {"zh": f"科目{s}", "subcategories": ["x"], "categories": categories[s]} for s in golds}
    root.mkdir(parents=True)
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    for s, g in golds.items():
        write_csv(root / "test" / f"{s}.csv", CMMLU_HEADER, rows(g))
        write_csv(root / "dev" / f"{s}.csv", CMMLU_HEADER, rows("ABCDA", prefix="例题"))
    return root


def ceval_folder(root: Path, golds: dict[str, list[str]], split: str = "val") -> Path:
    mapping = {s: [s.title(), f"科目{s}", "STEM"] for s in golds}
    root.mkdir(parents=True)
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    for s, g in golds.items():
        data = rows(g) if split != "test" else [r[:-1] for r in rows(g)]
        write_csv(root / split / f"{s}_{split}.csv", CEVAL_HEADER if split != "test" else CEVAL_HEADER[:-7], data)
        write_csv(root / "dev" / f"{s}_dev.csv", CEVAL_HEADER + ",explanation",
                  [[*r, "因为"] for r in rows("ABCDA", prefix="例题")])
    return root


@pytest.fixture(scope="module")
def loaded(tiny_zh_model):
    return load_checked(tiny_zh_model, "cpu")


def letter_id(tokenizer, prompt: str, letter: str) -> int:
    base, full = tokenizer(prompt).input_ids, tokenizer(prompt + letter).input_ids
    assert full[:len(base)] == base and len(full) == len(base) + 1
    return full[-1]


@contextmanager
def favour(model, token_id: int, amount: float = 50.0):
    """Add `amount` to one token's logit wherever the model projects onto the vocabulary."""
    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., token_id] += amount
        return output

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_prompts_follow_each_benchmarks_wording():
    question, ex1, ex2 = q(0, "一加一等于几？"), q(0, "二加二？", "B"), q(1, "三加三？", "D")
    body = "一加一等于几？\nA. 一加一等于几？甲\nB. 一加一等于几？乙\nC. 丙\nD. 丁\n答案："
    shots = "二加二？\nA. 二加二？甲\nB. 二加二？乙\nC. 丙\nD. 丁\n答案：B\n\n" \
            "三加三？\nA. 三加三？甲\nB. 三加三？乙\nC. 丙\nD. 丁\n答案：D\n\n"
    ceval = "以下是中国关于高等数学考试的单项选择题，请选出其中的正确答案。\n\n"
    cmmlu = "以下是关于高等数学的单项选择题，请直接给出正确答案的选项。\n\n"
    assert build_prompt("ceval", "高等数学", question, []) == ceval + body
    assert build_prompt("ceval", "高等数学", question, [ex1, ex2]) == ceval + shots + body
    assert build_prompt("cmmlu", "高等数学", question, []) == cmmlu + body
    assert build_prompt("cmmlu", "高等数学", question, [ex1, ex2]) == cmmlu + shots + body


def test_control_token_strings_in_a_question_are_text(llama2_dir):
    """A benchmark question is data: its "</s>" is scored as text, never as the EOS id (zhllama.chat.control)."""
    tok = load_tokenizer(llama2_dir)
    prompt = build_prompt("cmmlu", "农学", Question("s", 0, "</s>？", ("甲", "乙", "丙", "丁"), "A", "0"), [])
    head = prompt[:prompt.index("</s>")]
    assert tok(prompt).input_ids[len(tok(head).input_ids):][:2] == [2, 29871]  # what the tokenizer alone does
    (seq,) = encode_prompts(tok, [prompt]).sequences
    # '</', 's', '>' then '？' \n 'A' '.' ... '答案：' continuing the text (no dummy '▁' after the cut)
    assert seq.ids == tok(head).input_ids + [829, 29879, 29958, 30882, 13, 29909, 29889, 29871, 31843, 13, 29933,
                                             29889, 29871, 231, 188, 156, 13, 29907, 29889, 29871, 231, 187, 156,
                                             13, 29928, 29889, 29871, 31968, 13, 234, 176, 151, 233, 164, 139, 30383]
    assert seq.ids.count(tok.eos_token_id) == 0 and seq.ids.count(tok.bos_token_id) == 1
    assert seq.targets == {0: [(74, 29909)], 1: [(74, 29933)], 2: [(74, 29907)], 3: [(74, 29928)]}


def test_batched_scores_equal_single_prompt_forward_and_bias_picks_b(loaded):
    model, tok = loaded
    questions = [q(i, "问题" + "很长的题目" * (3 * i) + "？", gold) for i, gold in enumerate("ABBCDB")]
    prompts = [build_prompt("cmmlu", "农学", x, questions[:2]) for x in questions]
    scores = score_questions(model, tok, prompts, batch_size=4, progress=False)
    assert scores.shape == (6, 4)
    for prompt, row in zip(prompts, scores, strict=True):
        ids = [letter_id(tok, prompt, letter) for letter in "ABCD"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([tok(prompt).input_ids])).logits[0, -1].float(), -1)
        np.testing.assert_allclose(row, logp[ids].numpy(), atol=1e-4)

    info = {"s": SubjectInfo("s", "农学", ("Other",))}
    b = letter_id(tok, prompts[0], "B")
    with favour(model, b):
        report = evaluate(model, tok, "cmmlu", {"s": questions}, {"s": []}, 0, info, batch_size=4, progress=False)
    assert {r["predicted"] for r in report["results"]} == {"B"}
    assert report["accuracy"]["micro"] == pytest.approx(3 / 6)
    assert [r["gold"] for r in report["results"]] == list("ABBCDB")
    assert report["method"]["letter_tokens"]["B"] == {"B": 6}


def test_short_context_drops_shots_then_cuts_the_head(loaded):
    model, tok = loaded
    question, examples = q(0, "一个比较长的问题" * 4), [q(1, "例一", "C"), q(2, "例二", "D")]
    info = {"s": SubjectInfo("s", "农学", ("Other",))}
    bare = build_prompt("cmmlu", "农学", question, [])
    limit, original = len(tok(bare).input_ids), model.config.max_position_embeddings
    try:
        model.config.max_position_embeddings = limit
        report = evaluate(model, tok, "cmmlu", {"s": [question]}, {"s": examples}, 2, info, progress=False)
        assert (report["fewer_shots"], report["truncated"]) == (1, 0) and report["first_prompts"]["s"] == bare
        model.config.max_position_embeddings = limit - 4
        report = evaluate(model, tok, "cmmlu", {"s": [question]}, {"s": examples}, 2, info, progress=False)
        assert report["truncated"] == 1
    finally:
        model.config.max_position_embeddings = original
    ids = tok(bare).input_ids
    kept = ids[:1] + ids[1 + 4:]  # BOS, then the prompt's last limit - 5 tokens
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([kept])).logits[0, -1].float(), -1)
    want = logp[[letter_id(tok, bare, letter) for letter in "ABCD"]].numpy()
    np.testing.assert_allclose(report["results"][0]["loglik"], want, atol=1e-4)


def test_categories_micro_and_macro_by_hand(loaded, tmp_path):
    model, tok = loaded
    golds = {"s1": list("BBAC"), "s2": list("BB"), "s3": list("AAAB")}
    cats = {"s1": ["STEM"], "s2": ["Social Science", "China specific"], "s3": ["Social Science"]}
    root = cmmlu_folder(tmp_path / "cmmlu", golds, cats)
    info, questions, dev = read_benchmark("cmmlu", root, "test", 1)
    with favour(model, letter_id(tok, "答案：", "B")):
        report = evaluate(model, tok, "cmmlu", questions, dev, 1, info, batch_size=3, progress=False)
    assert [report["subjects"][s]["accuracy"] for s in golds] == [0.5, 1.0, 0.25]
    cat = report["categories"]
    assert list(cat) == ["STEM", "Social Science", "China specific"]
    assert (cat["STEM"]["micro"], cat["STEM"]["macro"]) == (0.5, 0.5)
    assert cat["Social Science"]["micro"] == pytest.approx(3 / 6)
    assert cat["Social Science"]["macro"] == pytest.approx((1.0 + 0.25) / 2)
    assert (cat["China specific"]["micro"], cat["China specific"]["subjects"]) == (1.0, 1)
    assert report["accuracy"]["micro"] == pytest.approx(5 / 10)
    assert report["accuracy"]["macro"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert [(r["subject"], r["index"]) for r in report["results"]][:2] == [("s1", 0), ("s1", 1)]


def test_ceval_test_split_writes_the_submission(tiny_zh_model, tmp_path, capsys):
    root = ceval_folder(tmp_path / "ceval", {"computer_network": list("ABC"), "art_studies": list("AB")}, "test")
    out = tmp_path / "out" / "r.json"
    report = run_mc(tiny_zh_model, "ceval", root, "test", 1, None, out, batch_size=2, device="cpu")
    sub = json.loads((tmp_path / "out" / "r.submission.json").read_text())
    assert list(sub) == ["computer_network", "art_studies"]
    assert list(sub["computer_network"]) == ["0", "1", "2"] and list(sub["art_studies"]) == ["0", "1"]
    assert all(v in "ABCD" for s in sub.values() for v in s.values())
    saved = json.loads(out.read_text())
    assert saved["accuracy"] is None and "not computed" in saved["note"] and report["accuracy"] is None
    prompt = (tmp_path / "out" / "r.prompts" / "art_studies.txt").read_text()
    assert prompt.startswith("以下是中国关于科目art_studies考试") and prompt.endswith("选项四\n答案：")
    assert (tmp_path / "out" / "r.md").is_file() and "not computed" in capsys.readouterr().out


def _break(root: Path, case: str) -> tuple[str, str, list[str]]:
    """Damage a good CMMLU fixture; (task, split, words the message must contain)."""
    csv = root / "test" / "s1.csv"
    if case == "missing column":
        csv.write_text(",Question,A,B,C,Answer\n0,问,1,2,3,A\n", encoding="utf-8")
        return "cmmlu", "test", [str(csv), ":1", "D"]
    if case == "bad answer":
        write_csv(csv, CMMLU_HEADER, rows("ABEA"))
        return "cmmlu", "test", [str(csv), ":4", "row 2", "'E'"]
    if case == "missing subject file":
        (root / "dev" / "s2.csv").unlink()
        return "cmmlu", "test", [str(root / "dev" / "s2.csv"), "missing"]
    if case == "no mapping":
        (root / "subject_mapping.json").unlink()
        return "cmmlu", "test", [str(root / "subject_mapping.json"), "missing"]
    if case == "unknown task":
        return "gsm8k", "test", ["gsm8k", "ceval, cmmlu or mmlu"]
    return "cmmlu", "val", ["cmmlu", "'val'", "dev or test"]  # CMMLU has no val split


@pytest.mark.parametrize("case", ["missing column", "bad answer", "missing subject file", "no mapping",
                                  "unknown task", "no val split", "shots", "unknown subject"])
def test_bad_input_is_one_line_and_writes_nothing(tiny_zh_model, tmp_path, case):
    root = cmmlu_folder(tmp_path / "cmmlu", {"s1": list("AB"), "s2": list("C")},
                        {"s1": ["STEM"], "s2": ["Other"]})
    task, split, words, shots, subjects = "cmmlu", "test", [], 1, None
    if case == "shots":
        shots, words = 6, ["--shots 6", "0..5"]
    elif case == "unknown subject":
        subjects, words = ["s1", "nope"], ["nope", str(root / "subject_mapping.json")]
    else:
        task, split, words = _break(root, case)
    out = tmp_path / "out" / "r.json"
    with pytest.raises(ZhllamaError) as err:
        run_mc(tiny_zh_model, task, root, split, shots, subjects, out, device="cpu")
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_cmmlu_writes_json_and_markdown(tiny_zh_model, tmp_path):
    root = cmmlu_folder(tmp_path / "cmmlu", {"s1": list("AB"), "s2": list("CD")},
                        {"s1": ["STEM"], "s2": ["Humanities", "China specific"]})
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "zhllama", "eval", "mc", "--model", str(tiny_zh_model),
                           "--task", "cmmlu", "--data-dir", str(root), "--split", "test", "--shots", "1",
                           "--out", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["questions"] == 4 and len(report["results"]) == 4 and report["accuracy"]["questions"] == 4
    assert (tmp_path / "r.md").read_text().startswith("## cmmlu test, 1-shot: 4 questions")
    assert "| China specific | 1 | 2 |" in done.stdout
