"""Which way of adapting a Llama to Chinese wins, at small scale, with numbers anyone can reproduce (issue 16.4).

One run, in order:
1. A base that knows English: the `small` preset with the Llama-2 vocabulary, pretrained on English text
   (../shared/data/en: the C4 and Wikipedia demos and tinyshakespeare) for a fixed number of steps.
2. Five arms, each adapted on the same Chinese text (../shared/data/pretrain_zh, 12 registers) for the same number
   of optimizer steps of the same batch (the same compute, as steps; the wall-clock is reported too):
   (a) Llama-2 vocabulary, full training; (b) extended vocabulary, mean init, full training; (c) extended, random
   init; (d) extended, mean init, `--trainable new-rows` for the first half of the steps, then full; (e) arm (b)
   with 20% English replay (`--data zh:0.8 --data en:0.2`).
3. For every arm: held-out Chinese bits per character (../shared/data/eval/ppl_zh, 7 domains) and held-out English
   bits per character (wikitext-2 test), training tokens/s and Chinese characters/s, greedy generation tokens/s
   and characters/s, and the loss against Chinese characters seen (one PNG with every arm).

Bits per character does not depend on the vocabulary, so it is the figure to compare. The claim under test is the
seeds' "extending the vocabulary makes Chinese 350% faster without hurting the model".
--quick runs the same road on the `tiny` preset with a few steps, to check the script (its figures mean nothing).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, parser, write_results

ARMS = {"a": "Llama-2 vocab, full", "b": "extended, mean init, full", "c": "extended, random init, full",
        "d": "extended, mean init, new rows then full", "e": "extended, mean init, full, 20% English replay"}
SEQ = 256


def texts_of(path: Path, limit_chars: int) -> list[str]:
    """Documents of a .jsonl (its `text` fields) or a plain-text file (paragraphs), up to limit_chars in all."""
    if path.suffix == ".jsonl":
        docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    else:
        docs = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    out, total = [], 0
    for doc in docs:
        if total >= limit_chars:
            break
        out.append(doc[: limit_chars - total])
        total += len(out[-1])
    return out


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def corpora(data: Path, work: Path, quick: bool) -> dict:
    scale = 0.1 if quick else 1.0
    zh = [d for f in sorted((data / "pretrain_zh").glob("*.jsonl")) for d in texts_of(f, int(250_000 * scale))]
    en = [d for f in ("llamafactory_c4_demo.jsonl", "llamafactory_wiki_demo.txt", "tinyshakespeare.txt")
          for d in texts_of(data / "en" / f, int(1_000_000 * scale))]
    zh_held = [d for f in sorted((data / "eval" / "ppl_zh").glob("*.jsonl"))
               for d in texts_of(f, int(8_000 * scale))]
    en_held = texts_of(data / "en" / "wikitext-2-raw" / "wiki.test.raw", int(50_000 * scale))
    return {"zh": write_jsonl(work / "zh_train.jsonl", zh), "en": write_jsonl(work / "en_train.jsonl", en),
            "zh_held": zh_held, "en_held": en_held, "zh_chars": sum(map(len, zh)), "en_chars": sum(map(len, en))}


def chars_per_token(tok_dir: Path, path: Path) -> float:
    from zhllama.model.loading import load_tokenizer

    tok = load_tokenizer(tok_dir)
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line.strip()][:2000]
    return sum(map(len, docs)) / sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)


def train(model: Path, data, out: Path, steps: int, quick: bool, **overrides) -> tuple[Path, float]:
    from zhllama.config import TrainConfig
    from zhllama.train import pretrain

    cfg = TrainConfig(max_steps=steps, batch_size=4 if quick else 8, lr=1e-3, warmup_steps=max(1, steps // 20),
                      save_every=10**9, eval_every=10**9, eval_batches=2, log_every=max(1, steps // 40), seed=0,
                      precision="fp32", keep_checkpoints=1, **overrides)
    start = time.perf_counter()
    pretrain(model, data, out, cfg)
    return out / "final", time.perf_counter() - start


def measure(model_dir: Path, zh_held: list[str], en_held: list[str], quick: bool) -> dict:
    import torch

    from zhllama.eval.ppl import perplexity
    from zhllama.model.loading import load_checked

    model, tok = load_checked(model_dir, "cpu")
    zh = perplexity(model, tok, zh_held, seq_len=SEQ, stride=SEQ // 2, progress=False)
    en = perplexity(model, tok, en_held, seq_len=SEQ, stride=SEQ // 2, progress=False)
    ids = tok("北京是中国的首都，", return_tensors="pt").input_ids
    new = 16 if quick else 64
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        seconds = time.perf_counter() - start
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"zh_bits_per_char": zh.bits_per_char, "en_bits_per_char": en.bits_per_char,
            "gen_tokens_per_s": new / seconds, "gen_chars_per_s": len(text) / seconds}


def curve(run: Path, zh_chars_per_token: float) -> list[tuple[float, float]]:
    """(Chinese characters seen, training bits per character) per logged step. Per character, so that arms with
    different vocabularies compare; a mix counts only its Chinese source's tokens (its loss is over both)."""
    points = []
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            share = next(iter(rec["source_shares"].values())) if "source_shares" in rec else 1.0
            points.append((rec["tokens"] * share * zh_chars_per_token, rec["loss"] / math.log(2) / zh_chars_per_token))
    return points


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, a few steps: checks the script only")
    p.add_argument("--base-steps", type=int, default=None, help="English pretraining steps of the base")
    p.add_argument("--steps", type=int, default=None, help="Chinese adaptation steps of every arm")
    p.add_argument("--vocab", type=int, default=40_000, help="size of the extended vocabulary")
    args = p.parse_args()
    from zhllama import model, tokenizer
    from zhllama.assets import vocab_gguf
    from zhllama.data.pack import pack

    quick = args.quick
    work = args.work / "adaptation_study"
    # Sized so that the whole run stays under 40 minutes on 2 CPU cores (about 4.5 s per step of the small preset).
    base_steps = args.base_steps or (6 if quick else 80)
    steps = args.steps or (6 if quick else 60)
    t0 = time.perf_counter()
    text = corpora(args.data, work / "text", quick)
    llama2 = tokenizer.from_gguf(vocab_gguf("llama-spm"), work / "tok-llama2")
    extended = tokenizer.extend(llama2, [text["zh"]], args.vocab, work / "tok-zh")
    packed = {(name, tok): pack(tok_dir, [text[name]], SEQ, work / f"packed-{name}-{tok}")
              for tok, tok_dir in (("llama2", llama2), ("zh", extended)) for name in ("zh", "en")}
    cpt = {tok: chars_per_token(d, text["zh"]) for tok, d in (("llama2", llama2), ("zh", extended))}
    preset = "tiny" if quick else "small"
    base, base_s = train(model.init_model(preset, llama2, work / "init", seed=0), packed["en", "llama2"],
                         work / "base", base_steps, quick)
    mean = model.extend_vocab(base, extended, work / "base-zh-mean", init="mean")
    rand = model.extend_vocab(base, extended, work / "base-zh-random", init="random")
    zh, en = packed["zh", "zh"], packed["en", "zh"]
    runs = {"a": (base, packed["zh", "llama2"], {}), "b": (mean, zh, {}), "c": (rand, zh, {}),
            "e": (mean, [f"{zh}:0.8", f"{en}:0.2"], {})}
    results = {"base": {"steps": base_steps, "seconds": base_s, **measure(base, text["zh_held"], text["en_held"],
                                                                          quick)}}
    curves = {}
    for arm in "abcde":
        out = work / f"arm-{arm}"
        if arm == "d":  # half the steps on the new rows alone, then the other half on everything
            first, s1 = train(mean, zh, work / "arm-d-rows", steps // 2, quick, trainable="new-rows")
            final, s2 = train(first, zh, out, steps - steps // 2, quick)
            seconds = s1 + s2
            points = curve(work / "arm-d-rows", cpt["zh"])
            points += [(x + points[-1][0], y) for x, y in curve(out, cpt["zh"])]
        else:
            start_model, data, extra = runs[arm]
            final, seconds = train(start_model, data, out, steps, quick, **extra)
            points = curve(out, cpt["llama2" if arm == "a" else "zh"])
        tokens = steps * (4 if quick else 8) * SEQ
        zh_share = 0.8 if arm == "e" else 1.0
        results[arm] = {"arm": ARMS[arm], "steps": steps, "seconds": seconds, "train_tokens_per_s": tokens / seconds,
                        "train_zh_chars_per_s": tokens * zh_share * cpt["llama2" if arm == "a" else "zh"] / seconds,
                        **measure(final, text["zh_held"], text["en_held"], quick)}
        curves[arm] = points
        print(f"arm {arm} ({ARMS[arm]}): {json.dumps(results[arm])}", flush=True)
    name = "adaptation_study" + ("_quick" if quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(curves, RESULTS / f"{name}.png").relative_to(RESULTS.parents[1])
    lines = [f"## Adaptation study ({preset} preset{', --quick: figures mean nothing' if quick else ''})", "",
             f"Base: {base_steps} steps of English ({text['en_chars']:,} characters); each arm: {steps} steps of "
             f"{4 if quick else 8} x {SEQ} tokens on Chinese ({text['zh_chars']:,} characters of 12 registers); "
             f"extended vocabulary {args.vocab:,} ({cpt['zh']:.2f} Chinese characters per token, Llama-2 "
             f"{cpt['llama2']:.2f}). Held-out: ppl_zh (7 domains), wikitext-2 test. "
             f"Total {time.perf_counter() - t0:,.0f} s.",
             "", "| arm | zh bits/char | en bits/char | train tok/s | train zh chars/s | gen tok/s | gen chars/s | "
             "wall s |", "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name = "base (English only)" if key == "base" else f"({key}) {r['arm']}"
        lines.append(f"| {name} | {r['zh_bits_per_char']:.3f} | {r['en_bits_per_char']:.3f} | "
                     f"{r.get('train_tokens_per_s', 0):,.0f} | {r.get('train_zh_chars_per_s', 0):,.0f} | "
                     f"{r['gen_tokens_per_s']:.1f} | {r['gen_chars_per_s']:.1f} | {r['seconds']:,.0f} |")
    lines.append(f"\nLoss against Chinese characters seen: {plot}")
    write_results(name, {"results": results, "curves": curves, "chars_per_token": cpt}, "\n".join(lines))


def plot_curves(curves: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], label=f"({arm}) {ARMS[arm]}")
    ax.set_xlabel("Chinese characters seen")
    ax.set_ylabel("training loss, bits per Chinese character")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
