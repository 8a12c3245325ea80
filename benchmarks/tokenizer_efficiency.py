"""Extend Llama-2's tokenizer to 55,296 pieces (Chinese-LLaMA-Alpaca-2's size) on shared/data/pretrain_zh and
compare tokens per character on the held-out 7-domain set (eval/ppl_zh) with Llama-2 and Chinese-LLaMA-Alpaca-2.

Also compares the score schemes for new pieces (zh-rank, append, zero) on the same trained Chinese model, and
counts how often each tokenizer's fast (tokenizer.json) ids disagree with sentencepiece's own.
English (en/) and code (code/) token counts must equal Llama-2's exactly.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results

from zhllama import tokenizer
from zhllama.tokenizer.hf import write_hf_tokenizer
from zhllama.tokenizer.spm import load_proto

TARGET = 55_296


def read_jsonl(paths, field="text"):
    return [json.loads(line)[field] for p in paths for line in Path(p).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def code_texts(data: Path) -> list[str]:
    lines = (data / "code" / "HumanEval.jsonl").read_text(encoding="utf-8").splitlines()
    human_eval = [json.loads(line) for line in lines if line.strip()]
    alpaca = json.loads((data / "code" / "code_alpaca_2k.json").read_text(encoding="utf-8"))
    return ([r["prompt"] + r["canonical_solution"] + r["test"] for r in human_eval]
            + [r["output"] for r in alpaca if r.get("output")])


def english_texts(data: Path) -> list[str]:
    texts = read_jsonl([data / "en" / "llamafactory_c4_demo.jsonl"])
    for name in ("llamafactory_wiki_demo.txt", "tinyshakespeare.txt"):
        texts += [ln for ln in (data / "en" / name).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return texts


def count(model_file: Path, fast_dir: Path | None, corpora: dict[str, list[str]]) -> dict:
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    row = {"vocab": sp.get_piece_size(), "tokens": {}, "disagreements": None}
    for name, texts in corpora.items():
        row["tokens"][name] = sum(map(len, sp.encode(texts)))
    if fast_dir is not None:
        fast = AutoTokenizer.from_pretrained(str(fast_dir))
        zh = corpora["zh"]
        start = time.perf_counter()
        fast_ids = fast(zh, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        row["fast_encode_chars_per_s"] = sum(map(len, zh)) / (time.perf_counter() - start)
        row["disagreements"] = sum(a != b for a, b in zip(fast_ids, sp.encode(zh), strict=True))
    return row


def main() -> None:
    args = parser(__doc__).parse_args()
    data, work = args.data, args.work
    work.mkdir(parents=True, exist_ok=True)
    base_model = data / "llama2-tokenizer.model"
    cla2_model = data / "tokenizers" / "chinese-llama-alpaca-2" / "tokenizer.model"
    train_files = sorted((data / "pretrain_zh").glob("*.jsonl"))
    corpora = {"zh": read_jsonl(sorted((data / "eval" / "ppl_zh").glob("*.jsonl"))),
               "en": english_texts(data), "code": code_texts(data)}
    chars = {k: sum(map(len, v)) for k, v in corpora.items()}
    wanted = TARGET - 32_000

    start = time.perf_counter()
    zh_dir = tokenizer.train(train_files, int(wanted * 1.15) + 500, work / "zh-spm")
    train_s = time.perf_counter() - start
    rows = {}
    for scheme in tokenizer.SCORE_SCHEMES:
        out = tokenizer.merge(base_model, zh_dir, work / f"llama2-zh-{scheme}", scheme=scheme, max_new=wanted)
        rows[f"ours ({scheme})"] = count(out / "tokenizer.model", out, corpora)
    write_hf_tokenizer(load_proto(base_model), work / "llama2-hf")
    rows["Llama-2"] = count(base_model, work / "llama2-hf", corpora)
    write_hf_tokenizer(load_proto(cla2_model), work / "cla2-hf")
    rows["Chinese-LLaMA-Alpaca-2"] = count(cla2_model, work / "cla2-hf", corpora)

    base = rows["Llama-2"]["tokens"]
    lines = [f"Held-out zh: eval/ppl_zh (7 domains, {chars['zh']:,} chars); en: en/* ({chars['en']:,} chars); "
             f"code: HumanEval + code_alpaca ({chars['code']:,} chars). Chinese model trained in {train_s:.0f} s.",
             "", "| tokenizer | vocab | zh tok/char | en tokens = Llama-2 | code tokens = Llama-2 | "
             "fast != sentencepiece (zh docs) |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        row["tok_per_char"] = {k: row["tokens"][k] / chars[k] for k in chars}
        lines.append(f"| {name} | {row['vocab']:,} | {row['tok_per_char']['zh']:.4f} | "
                     f"{row['tokens']['en'] == base['en']} | {row['tokens']['code'] == base['code']} | "
                     f"{row['disagreements']} / {len(corpora['zh'])} |")
    ours = rows["ours (zh-rank)"]["tok_per_char"]["zh"]
    cla2 = rows["Chinese-LLaMA-Alpaca-2"]["tok_per_char"]["zh"]
    lines += ["", f"ours (zh-rank) / Chinese-LLaMA-Alpaca-2 = {ours / cla2:.3f} tokens (goal: at most 0.60 tok/char, "
              f"i.e. 10% fewer); ours / Llama-2 = {ours / rows['Llama-2']['tok_per_char']['zh']:.3f}"]
    write_results("tokenizer_efficiency", {"rows": rows, "chars": chars, "train_seconds": train_s},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
