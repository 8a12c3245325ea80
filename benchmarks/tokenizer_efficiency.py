"""Extend Llama-2's tokenizer to 55,296 pieces (Chinese-LLaMA-Alpaca-2's size) on shared/data/pretrain_zh and
compare tokens per character on the held-out 7-domain set (eval/ppl_zh) with Llama-2 and Chinese-LLaMA-Alpaca-2.

Also compares the score schemes for new pieces (zh-rank, append, zero) on the same trained Chinese model, and
counts how often each tokenizer's fast (tokenizer.json) ids disagree with sentencepiece's own.
English (en/) and code (code/) token counts must equal Llama-2's exactly.

Second part (`vocabularies`), the Aquila-style table over real vocabularies: tokens per character on the
first 400k characters of each ppl_zh domain, English and code, for Llama-2, Llama-3, Qwen2, Aquila, Baichuan,
DeepSeek-LLM (llama.cpp's vocabulary GGUFs), Chinese-LLaMA-Alpaca-2, our Llama-2 extension (55,296) and Llama-3
extended with Chinese merges trained on pretrain_zh; plus the curve of tokens/char against the number of new
Llama-3 tokens. SentencePiece vocabularies are counted with sentencepiece, byte-level BPE ones with the
tokenizers library.
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


# Reference tokens/char on ppl_zh measured with llama.cpp (issue 14); our figures should land close to them.
REFERENCE = {"Llama-2": 1.424, "Llama-3": 0.798, "Baichuan": 0.718, "Chinese-LLaMA-Alpaca-2": 0.664,
             "DeepSeek-LLM": 0.650, "Qwen2": 0.630, "Aquila": 0.571}
GGUF_VOCABS = {"Llama-3": "llama-bpe", "Qwen2": "qwen2", "Aquila": "aquila", "Baichuan": "baichuan",
               "DeepSeek-LLM": "deepseek-llm"}
DOMAIN_CHARS = 400_000
CURVE = (5_000, 10_000, 25_000, 50_000)
HEADLINE = 25_000


def ppl_zh_head(data: Path, limit: int = DOMAIN_CHARS) -> dict[str, list[str]]:
    """The first `limit` characters of each ppl_zh domain, in file order (the last document cut)."""
    out = {}
    for path in sorted((data / "eval" / "ppl_zh").glob("*.jsonl")):
        texts, left = [], limit
        for text in read_jsonl([path]):
            if left <= 0:
                break
            texts.append(text[:left])
            left -= len(texts[-1])
        out[path.stem.removeprefix("skywork_zh_")] = texts
    return out


class Counter:
    """Token counts without special tokens: sentencepiece for a tokenizer.model, tokenizers for a tokenizer.json."""

    def __init__(self, folder: Path | None = None, tok=None):
        self.sp = None
        if tok is None and folder is not None and (folder / "tokenizer.model").is_file():
            self.sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self.vocab = self.sp.get_piece_size()
            return
        from tokenizers import Tokenizer

        self.tok = tok or Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.vocab = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return self.sp.encode(texts)
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


def gguf_folder(name: str, work: Path) -> tuple[Path, str]:
    """An HF folder for a llama.cpp vocabulary: `tokenizer from-gguf`, or transformers where that cannot read it."""
    from zhllama.assets import vocab_gguf
    from zhllama.errors import ZhllamaError

    out = work / "vocabs" / name
    if (out / "tokenizer.json").is_file():
        return out, json.loads((out / "loader.json").read_text())["loader"]
    gguf = vocab_gguf(name)
    try:
        tokenizer.from_gguf(gguf, out)
        loader = "zhllama from-gguf"
    except ZhllamaError:  # byte-level BPE GGUFs, until from_gguf reads them
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(out))
        loader = "transformers gguf_file"
    (out / "loader.json").write_text(json.dumps({"loader": loader}))
    return out, loader


def row(counter: Counter, corpora: dict[str, list[str]], base_ids: dict | None = None) -> dict:
    ids = {name: counter.encode(texts) for name, texts in corpora.items()}
    tokens = {name: sum(map(len, v)) for name, v in ids.items()}
    chars = {name: sum(map(len, texts)) for name, texts in corpora.items()}
    zh = [d for d in corpora if d not in ("en", "code")]
    out = {"vocab": counter.vocab, "tokens": tokens,
           "tok_per_char": {"zh": sum(tokens[d] for d in zh) / sum(chars[d] for d in zh),
                            **{d: tokens[d] / chars[d] for d in corpora}}}
    if base_ids is not None:  # English and code must be the base's ids, token for token
        out["en_code_ids_equal_base"] = all(ids[d] == base_ids[d] for d in ("en", "code"))
    return out, ids


def vocabularies(data: Path, work: Path, en: list[str], code: list[str], max_chars: int | None = None):
    from zhllama.tokenizer import bpe_extend

    corpora = {**ppl_zh_head(data), "en": en, "code": code}
    chars = {d: sum(map(len, t)) for d, t in corpora.items()}
    train_files = sorted((data / "pretrain_zh").glob("*.jsonl"))
    rows, loaders, ids = {}, {}, {}
    rows["Llama-2"], got = row(Counter(work / "llama2-hf"), corpora)
    ids["Llama-2"] = {d: got[d] for d in ("en", "code")}
    for name, gguf in GGUF_VOCABS.items():
        folder, loaders[name] = gguf_folder(gguf, work)
        rows[name], got = row(Counter(folder), corpora)
        if name == "Llama-3":
            ids[name] = {d: got[d] for d in ("en", "code")}
    rows["Chinese-LLaMA-Alpaca-2"], _ = row(Counter(data / "tokenizers" / "chinese-llama-alpaca-2"), corpora)
    llama2_zh = tokenizer.extend(data / "llama2-tokenizer.model", train_files, TARGET, work / "llama2-zh-55296")
    rows["ours: Llama-2 extended (55,296)"], _ = row(Counter(llama2_zh), corpora, ids["Llama-2"])

    l3_dir = work / "vocabs" / "llama-bpe"
    base = bpe_extend.load_bpe_json(l3_dir)
    start = time.perf_counter()
    l3_zh = tokenizer.extend(l3_dir, train_files, bpe_extend.next_id(base) + HEADLINE, work / "llama3-zh-25k",
                             max_chars=max_chars)
    extend_s = time.perf_counter() - start
    headline = f"ours: Llama-3 + {HEADLINE:,} (tokenizer extend)"
    rows[headline], _ = row(Counter(l3_zh), corpora, ids["Llama-3"])

    # The curve: one training, then prefixes of the accepted merges (any prefix is closed: parts come first).
    start = time.perf_counter()
    merges = bpe_extend.select_merges(base, bpe_extend.train_bpe(base, train_files, 256 + 2 * max(CURVE) + 30_000,
                                                                 max_chars=max_chars), max_new=max(CURVE))
    curve_s = time.perf_counter() - start
    curve = {}
    for n in (0, *CURVE):
        if n > len(merges):
            break
        tok = bpe_extend._tokenizer(bpe_extend.append_merges(base, merges[:n]))
        curve[n], _ = row(Counter(tok=tok), corpora, ids["Llama-3"])

    lines = [f"Aquila-style table. zh: first {DOMAIN_CHARS:,} chars of each eval/ppl_zh domain "
             f"({sum(chars[d] for d in corpora if d not in ('en', 'code')):,} chars); en {chars['en']:,} chars; "
             f"code {chars['code']:,} chars. Llama-3 merges trained on pretrain_zh"
             f"{'' if max_chars is None else f' (first {max_chars:,} chars)'}; extend took {extend_s:.0f} s.", "",
             "| tokenizer | vocab | zh tok/char | llama.cpp ref | en tok/char | code tok/char | en+code = base |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t, ref = r["tok_per_char"], f"{REFERENCE[name]:.3f}" if name in REFERENCE else ""
        lines.append(f"| {name} | {r['vocab']:,} | {t['zh']:.3f} | {ref} | {t['en']:.4f} | "
                     f"{t['code']:.4f} | {r.get('en_code_ids_equal_base', '')} |")
    lines += ["", f"Curve: Llama-3 + N Chinese tokens (one training, {curve_s:.0f} s; {len(merges):,} accepted)", "",
              "| new tokens | zh tok/char | en+code ids = Llama-3 |", "|---|---|---|"]
    lines += [f"| {n:,} | {r['tok_per_char']['zh']:.3f} | {r['en_code_ids_equal_base']} |" for n, r in curve.items()]
    ok = rows[headline]["tok_per_char"]["zh"] <= 0.60 and rows[headline]["en_code_ids_equal_base"]
    lines += ["", f"goal (Llama-3 + <= 25,000 tokens: zh <= 0.60 tok/char, en and code unchanged): "
              f"{'met' if ok else 'NOT met'}"]
    payload = {"vocabularies": {"rows": rows, "chars": chars, "loaders": loaders, "reference_llama_cpp": REFERENCE,
                                "curve": {str(n): r for n, r in curve.items()}, "curve_accepted": len(merges),
                                "extend_seconds": extend_s, "curve_seconds": curve_s,
                                "train_max_chars": max_chars, "goal_met": ok}}
    return payload, lines


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max-train-chars", type=int, default=None,
                   help="train the Llama-3 merges on this many characters of pretrain_zh (default: all of it)")
    args = p.parse_args()
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
    vocab_payload, vocab_lines = vocabularies(data, work, english_texts(data), code_texts(data),
                                              max_chars=args.max_train_chars)
    write_results("tokenizer_efficiency", {"rows": rows, "chars": chars, "train_seconds": train_s,
                                           **vocab_payload}, "\n".join(lines + ["", *vocab_lines]))


if __name__ == "__main__":
    main()
