from zhllama.demo import run_demo
from zhllama.train import loop


def test_quick_demo_runs_the_whole_road(tmp_path, monkeypatch):
    # The demo trains with `precision: auto`, which is bf16 only on CPUs with AVX512-BF16: forced to fp32 here so that
    # its figures are the same on every machine (tests/train/test_precision.py runs both precisions everywhere).
    monkeypatch.setattr(loop, "bf16_is_fast", lambda: False)
    summary = run_demo(tmp_path / "demo", quick=True)
    base, extended = summary["tokenizer"]
    assert (base["vocab_size"], extended["vocab_size"]) == (32_000, 34_000)
    assert extended["tokens_per_char"]["zh"] < 0.75 * base["tokens_per_char"]["zh"]
    assert extended["tokens"]["en"] == base["tokens"]["en"] and extended["tokens"]["code"] == base["tokens"]["code"]
    assert base["lossless"] and extended["lossless"]
    assert summary["model"]["rows_before"] == 32_000 and summary["model"]["rows_after"] == 34_000
    assert summary["clean"]["documents"]["kept"] < summary["clean"]["documents"]["in"]
    assert summary["pretrain"]["after"]["perplexity"] < summary["pretrain"]["before"]["perplexity"]
    sft = summary["sft"]
    assert sft["before"]["n"] == sft["after"]["n"] == 40 and sft["steps"] == 4
    assert sum(sft["after"]["predicted"].values()) == 40
    final = tmp_path / "demo" / "run-sft" / "final"
    assert "<s>Human: " in (final / "chat_template.jinja").read_text()
    dpo = summary["dpo"]
    assert dpo["pairs"] == 64 and dpo["steps"] == 4 and dpo["before"] == sft["after"]
    assert list(dpo["reward_accuracy"]) == [2, 4] and sum(dpo["after"]["predicted"].values()) == 40
    assert "<s>Human: " in (tmp_path / "demo" / "run-dpo" / "final" / "chat_template.jinja").read_text()
    for folder in ("tokenizer-llama2", "tokenizer-zh", "model-tiny-llama2", "model-tiny-zh", "packed",
                   "run-pretrain", "run-sft", "run-dpo", "run-dpo/final"):
        assert (tmp_path / "demo" / folder / "zhllama.json").exists()
    serve = summary["serve"]
    assert serve["requests"] == 16 and serve["same_replies"] is True  # batching does not change greedy replies
    scores = summary["eval"]
    assert list(scores) == ["tiny, Llama-2 vocab (random)", "tiny + zh vocab (mean init)", "after pretraining",
                            "after SFT", "after DPO"]
    bits = [scores[name]["ppl"]["bits_per_char"] for name in scores]
    assert bits[2] < bits[1]  # pretraining lowers bits per character on held-out text
    assert len({scores[name]["ppl"]["chars"] for name in scores}) == 1  # every model reads the same characters
    # Stage 9's retention figures are stage 12's bits per character of the same two models
    assert sft["replay"] == 0.1 and sft["heldout_bits_per_char"] == {
        "after_pretraining": scores["after pretraining"]["ppl"]["bits_per_char"],
        "after_sft": scores["after SFT"]["ppl"]["bits_per_char"]}
    # The quiz: 16 held-out reviews, 8 正面 (A) and 8 负面 (B). In quick mode no model can do it (each answers one
    # letter throughout: C or D, 0%), so check that the stage scores what it says: every question answered, gold
    # letters balanced, and hits only where an A/B answer can meet an A/B gold letter.
    for name, row in scores.items():
        pred, gold = row["quiz_predicted"], row["quiz_gold"]
        assert gold == {"A": 8, "B": 8, "C": 0, "D": 0}, name
        assert sum(pred.values()) == row["quiz_questions"] == 16, name
        assert row["quiz_correct"] <= min(pred["A"], gold["A"]) + min(pred["B"], gold["B"]), name
        assert row["quiz_accuracy"] == row["quiz_correct"] / 16, name
    # SFT and DPO changed the model (a stage that saved its input unchanged would give the same figure).
    assert scores["after SFT"]["ppl"]["nll_sum"] != scores["after pretraining"]["ppl"]["nll_sum"]
    assert scores["after DPO"]["ppl"]["nll_sum"] != scores["after SFT"]["ppl"]["nll_sum"]
    gguf = summary["gguf"]
    assert gguf["file"].endswith("model-q8_0.gguf") and gguf["bytes"] > 0
    # Both backends answered (the 4-step quick model may answer with its end of turn at once: an empty reply; the
    # GGUF round trip itself is checked token for token in tests/export).
    assert set(gguf["answers"]) == {"llama.cpp q8_0", "HF fp32"}
    assert all(isinstance(answer, str) for answer in gguf["answers"].values())


def test_quick_demo_runs_the_road_on_llama3(tmp_path, monkeypatch):
    """The same road from Llama-3's 128k byte-level BPE vocabulary, with the llama3 chat template."""
    monkeypatch.setattr(loop, "bf16_is_fast", lambda: False)
    summary = run_demo(tmp_path / "demo", quick=True, base="llama3")
    base, extended = summary["tokenizer"]
    assert (base["vocab_size"], extended["vocab_size"]) == (128_256, 128_256 + 4_096)
    assert extended["tokens_per_char"]["zh"] < base["tokens_per_char"]["zh"]
    assert extended["tokens"]["en"] == base["tokens"]["en"] and extended["tokens"]["code"] == base["tokens"]["code"]
    assert base["lossless"] and extended["lossless"]
    assert summary["model"]["rows_before"] == 128_256 and summary["model"]["rows_after"] == 128_256 + 4_096
    assert summary["pretrain"]["after"]["perplexity"] < summary["pretrain"]["before"]["perplexity"]
    final = tmp_path / "demo" / "run-sft" / "final"
    assert "<|start_header_id|>" in (final / "chat_template.jinja").read_text()
    assert not (final / "tokenizer.model").exists()  # tokenizer.json is the whole tokenizer
    assert summary["serve"]["requests"] == 16 and summary["serve"]["same_replies"] is True
    assert list(summary["eval"])[0] == "tiny, Llama-3 vocab (random)"
    gguf = summary["gguf"]
    assert set(gguf["answers"]) == {"llama.cpp q8_0", "HF fp32"}  # both answered (maybe with an empty reply)
    assert all(isinstance(answer, str) for answer in gguf["answers"].values())
