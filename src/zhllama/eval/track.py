"""The growth of a model through a training run: every K-th checkpoint (and final/) scored the same way.

AtomGPT calls this its growth platform. For each checkpoint: perplexity and bits per character on a fixed held-out
set, optionally accuracy on a subset of a CMMLU-layout benchmark, and greedy answers to a few fixed prompts. One
HTML page shows the curves against training tokens, the numbers, and the answers side by side.

A checkpoint holds only the weights that trained, so the model is built from the run's final/ (or, while the run
is still going, from the model it started from, named in run/zhllama.json) and the checkpoint's tensors are loaded
over it with safetensors; frozen weights are the same in both. Nothing is unpickled.

Resumable: each checkpoint's scores are written to out/scores/<name>.json as soon as they exist, and a checkpoint
whose scores are there, made with the same settings, is skipped. Scores made with other settings (other held-out
text, prompts, window) are redone, so the page never mixes numbers that cannot be compared.
"""

from __future__ import annotations

import hashlib
import html
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zhllama.artifacts import PROVENANCE, atomic_file, read_provenance, write_json_atomic, write_text_atomic
from zhllama.errors import ZhllamaError
from zhllama.eval.ppl import perplexity, read_documents, resolve_window
from zhllama.runs import STATE, list_checkpoints

DEFAULT_PROMPTS = ("中国的首都是", "请介绍一下长城。", "《三国演义》的作者是", "今天天气很好，我们", "人工智能是")
HELDOUT_DOCS, HELDOUT_CHARS = 100, 50_000  # a fixed slice of the built-in held-out set: fast, and the same every run
MAX_NEW_TOKENS = 32
MC_TASK, MC_SPLIT, MC_SHOTS, MC_PER_SUBJECT = "cmmlu", "test", 0, 10  # a quick, fixed subset per checkpoint
PLOTS = (("heldout_ppl.png", "ppl", "held-out perplexity", True),
         ("bits_per_char.png", "bits_per_char", "held-out bits per character", False),
         ("mc_accuracy.png", "mc_accuracy", f"{MC_TASK} subset accuracy", False))


@dataclass
class Point:
    """One state of the model in the run: a checkpoint, or final/."""

    name: str
    step: int
    weights: list[Path]


def model_source(run_dir: Path) -> Path:
    """The HF folder whose config, tokenizer and frozen weights every checkpoint of the run shares."""
    if (run_dir / "final" / "config.json").is_file():
        return run_dir / "final"
    started_from = read_provenance(run_dir).get("args", {}).get("model")
    if not started_from:
        raise ZhllamaError(f"{run_dir} has no final/ model and its {PROVENANCE} names no starting model")
    if not Path(started_from).is_dir():
        raise ZhllamaError(f"{run_dir / PROVENANCE}: the run's starting model {started_from} no longer exists")
    return Path(started_from)


def run_points(run_dir: Path, every: int) -> list[Point]:
    """Every `every`-th checkpoint (the first included) and final/, in training order."""
    points = []
    for folder in list_checkpoints(run_dir)[::every]:
        step = json.loads((folder / STATE).read_text())["step"]
        points.append(Point(folder.name, step, [folder / "model.safetensors"]))
    final = run_dir / "final"
    if (final / "config.json").is_file():
        weights = sorted(final.glob("*.safetensors"))
        if not weights:
            raise ZhllamaError(f"{final} has no .safetensors weights to score")
        points.append(Point("final", final_step(run_dir), weights))
    return points


def final_step(run_dir: Path) -> int:
    from zhllama.runs import read_log

    config = read_provenance(run_dir).get("args", {}).get("config", {})
    steps = [r["step"] for r in read_log(run_dir)] + [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)]
    return config.get("max_steps") or max(steps, default=0)


def training_tokens(run_dir: Path, step: int) -> int | None:
    """Tokens seen by `step`: the log's count at that step, else the log's tokens per step times the step."""
    from zhllama.runs import read_log

    train = [r for r in read_log(run_dir) if r.get("kind") == "train" and "tokens" in r]
    for record in train:
        if record["step"] == step:
            return int(record["tokens"])
    # Every step sees the same global batch, so any logged step gives the tokens per step.
    return round(train[0]["tokens"] / train[0]["step"] * step) if train else None


def heldout_texts(data: list[str | Path] | None) -> tuple[str, list[str]]:
    """(what it is, the documents): the given files, or a fixed slice of the built-in held-out documents."""
    if data:
        return ", ".join(str(p) for p in data), [t for path in data for t in read_documents(path)]
    from zhllama.data.builtin import documents

    texts, chars = [], 0
    for doc in documents("heldout"):
        if len(texts) == HELDOUT_DOCS or chars >= HELDOUT_CHARS:
            break
        texts.append(doc["text"])
        chars += len(doc["text"])
    return f"built-in held-out (first {len(texts)} documents)", texts


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a .txt (one a line) or .jsonl (`text` field) file, or the built-in ones."""
    return list(DEFAULT_PROMPTS) if path is None else read_documents(path)


def load_weights(model, files: list[Path], name: str) -> None:
    """Load safetensors files over the model's weights; the names must all be the model's own."""
    from safetensors.torch import load_file

    own = set(model.state_dict())
    for path in files:
        try:
            state = load_file(str(path))
        except Exception as exc:  # truncated files raise many different errors
            raise ZhllamaError(f"{path}: cannot read the weights ({type(exc).__name__})") from None
        foreign = sorted(set(state) - own)
        if foreign and any("lora_" in key for key in foreign):
            raise ZhllamaError(f"{path}: LoRA checkpoints cannot be tracked yet; score the run's merged final/ "
                               f"with `zhllama eval ppl`")
        if foreign:
            raise ZhllamaError(f"{path}: {name} does not match the run's model (unknown weight {foreign[0]})")
        model.load_state_dict(state, strict=False)


def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers from an HF engine over the loaded model, one prompt at a time (each is what the prompt alone
    gives, whatever else ran), so the same weights always give the same answers.

    The prompt rule of chat, generate and serve: a tokenizer with a chat template (an SFT run) gets the prompt as
    a user message (text, the template the only markup); without one (a pretraining run) the raw prompt is
    continued, encoded as plain text (a ``</s>`` in it is text, not EOS) and stopped as ``zhllama generate --raw
    --template atom`` stops. The engine is closed before this returns: the model is scored again right after.
    """
    from zhllama.chat.control import encode_plain
    from zhllama.infer import HFEngine, SamplingParams

    chat = bool(tokenizer.chat_template)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0)
    # A template name only for the raw path, where it sets no markup, only the stop string (and no warning).
    with HFEngine(model, tokenizer, None if chat else "atom", name="track", max_concurrency=1) as engine:
        params.check(engine.max_tokens_limit)
        answers = []
        for n, prompt in enumerate(prompts, 1):
            try:
                if chat:
                    ids = engine.encode_chat([{"role": "user", "content": prompt}], params)
                else:
                    ids = engine.check_prompt(encode_plain(tokenizer, [prompt], add_special_tokens=True)[0], params)
            except ZhllamaError as exc:
                raise ZhllamaError(f"prompt {n}: {exc}") from None
            answers.append(engine.generate(ids, params).text)
    return answers


def mc_subset(mc_data_dir: Path):
    """The fixed mc subset: the first MC_PER_SUBJECT test questions of every subject, read and checked once."""
    try:
        from zhllama.eval import mc
    except ImportError as exc:
        raise ZhllamaError(f"--mc-data-dir needs zhllama.eval.mc, which cannot be imported ({exc})") from None
    info, questions, dev = mc.read_benchmark(MC_TASK, mc_data_dir, MC_SPLIT, MC_SHOTS)
    return mc, info, {s: qs[:MC_PER_SUBJECT] for s, qs in questions.items()}, dev


def score_mc(model, tokenizer, subset, batch_size: int) -> dict:
    mc, info, questions, dev = subset
    report = mc.evaluate(model, tokenizer, MC_TASK, questions, dev, MC_SHOTS, info, batch_size=batch_size,
                         progress=False)
    overall = report["accuracy"] or {}
    return {"accuracy": overall.get("micro"), "macro": overall.get("macro"), "questions": report["questions"]}


def settings_of(data_name: str, texts: list[str], prompts: list[str], seq_len: int, stride: int,
                max_new_tokens: int, mc_data_dir: Path | None) -> dict:
    """What makes two checkpoints' scores comparable. Not the folder the model is built from: final/ replaces the
    starting model when the run ends, and a checkpoint's scores are the same over either."""
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    return {"heldout": data_name, "heldout_sha256": digest, "seq_len": seq_len,
            "stride": stride, "prompts": prompts, "max_new_tokens": max_new_tokens,
            "mc": None if mc_data_dir is None else {"data_dir": str(mc_data_dir), "task": MC_TASK, "split": MC_SPLIT,
                                                    "shots": MC_SHOTS, "per_subject": MC_PER_SUBJECT}}


def fmt(value, spec: str) -> str:
    """How the page shows a number (the tests read the page with the same formats)."""
    return "—" if value is None else format(value, spec)


def metric_cells(score: dict) -> list[str]:
    heldout, mc = score["heldout"], score.get("mc") or {}
    return [score["name"], fmt(score["step"], ","), fmt(score["tokens"], ","), fmt(heldout["ppl"], ".4f"),
            fmt(heldout["bits_per_char"], ".5f"), fmt(heldout["tokens_per_char"], ".4f"),
            fmt(mc.get("accuracy"), ".4f")]


def plot_curves(scores: list[dict], out: Path) -> list[str]:
    """One PNG per metric against training tokens (steps when the run logged no tokens); returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_tokens = all(s["tokens"] is not None for s in scores)
    written = []
    for filename, key, title, log_scale in PLOTS:
        points = [(s["tokens"] if by_tokens else s["step"], metric_value(s, key)) for s in scores]
        points = [(x, y) for x, y in points if y is not None]
        if not points:
            (out / filename).unlink(missing_ok=True)  # a plot left from a run with other settings
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([x for x, _ in points], [y for _, y in points], "o-")
        ax.set_xlabel("training tokens" if by_tokens else "training step")
        ax.set_title(title)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        try:
            with atomic_file(out / filename) as tmp:
                fig.savefig(tmp, dpi=90, format="png")
        finally:
            plt.close(fig)
        written.append(filename)
    return written


def metric_value(score: dict, key: str):
    return (score.get("mc") or {}).get("accuracy") if key == "mc_accuracy" else score["heldout"][key]


def render_html(run_dir: Path, scores: list[dict], plots: list[str], settings: dict) -> str:
    esc = html.escape
    header = ["checkpoint", "step", "training tokens", "ppl", "bits/char", "tokens/char", f"{MC_TASK} acc"]
    rows = "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in metric_cells(s)) + "</tr>" for s in scores)
    images = "\n".join(f'<img src="{esc(name)}" alt="{esc(name)}">' for name in plots)
    prompts = settings["prompts"]
    names = "".join(f"<th>{esc(s['name'])}</th>" for s in scores)
    answer_rows = "\n".join(
        f"<tr><th>{esc(prompt)}</th>" + "".join(f"<td>{esc(s['answers'][i]['answer'])}</td>" for s in scores)
        + "</tr>" for i, prompt in enumerate(prompts))
    return f"""<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><title>{esc(run_dir.name)}: growth</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }}
#metrics td {{ text-align: right; font-variant-numeric: tabular-nums; }}
#metrics td:first-child {{ text-align: left; }}
#answers td {{ min-width: 14em; white-space: pre-wrap; }}
.scroll {{ overflow-x: auto; }}
</style></head><body>
<h1>Training growth of {esc(str(run_dir))}</h1>
<p>Held-out text: {esc(settings["heldout"])}; window {settings["seq_len"]} tokens, stride {settings["stride"]}.
Perplexity is per token and depends on the tokenizer; bits per character does not.</p>
{images}
<h2>Scores</h2>
<table id="metrics"><thead><tr>{"".join(f"<th>{esc(h)}</th>" for h in header)}</tr></thead>
<tbody>
{rows}
</tbody></table>
<h2>Greedy answers ({settings["max_new_tokens"]} new tokens at most)</h2>
<div class="scroll"><table id="answers"><thead><tr><th>prompt</th>{names}</tr></thead>
<tbody>
{answer_rows}
</tbody></table></div>
</body></html>
"""


def run_track(run_dir: str | Path, every: int = 1, data: list[str | Path] | None = None,
              prompts: str | Path | None = None, mc_data_dir: str | Path | None = None,
              out: str | Path | None = None, device: str = "auto", seq_len: int | None = None,
              stride: int | None = None, batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Score every `every`-th checkpoint of a run (and final/), skipping those already scored; render the page."""
    from zhllama.model.loading import load_checked

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ZhllamaError(f"--run {run_dir} is not a folder")
    if every < 1:
        raise ZhllamaError(f"--every {every} must be at least 1")
    out = Path(out) if out is not None else run_dir / "track"
    points = run_points(run_dir, every)
    if not points:
        raise ZhllamaError(f"{run_dir} has no checkpoints and no final/ model to score")
    source = model_source(run_dir)
    data_name, texts = heldout_texts(data)
    prompt_list = read_prompts(prompts)
    mc_data_dir = Path(mc_data_dir) if mc_data_dir is not None else None
    subset = mc_subset(mc_data_dir) if mc_data_dir is not None else None  # checked before any model loads
    seq_len, stride = resolve_window(source, seq_len, stride)
    settings = settings_of(data_name, texts, prompt_list, seq_len, stride, max_new_tokens, mc_data_dir)
    (out / "scores").mkdir(parents=True, exist_ok=True)

    model = tokenizer = None  # loaded only when some checkpoint needs scoring
    scores = []
    for point in tqdm(points, desc="checkpoints", dynamic_ncols=True):
        path = out / "scores" / f"{point.name}.json"
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("settings") == settings:
                tqdm.write(f"{point.name}: skipped (already scored)", file=sys.stderr)
                scores.append(saved)
                continue
            tqdm.write(f"{point.name}: scored with other settings; scoring again", file=sys.stderr)
        if model is None:
            model, tokenizer = load_checked(source, device)
        started = time.perf_counter()
        load_weights(model, point.weights, point.name)
        result = perplexity(model, tokenizer, texts, seq_len, stride, batch_size, desc=f"{point.name} ppl")
        answers = greedy_answers(model, tokenizer, prompt_list, max_new_tokens)
        score = {"name": point.name, "step": point.step, "tokens": training_tokens(run_dir, point.step),
                 "weights": [str(p) for p in point.weights], "model_source": str(source), "heldout": result.to_dict(),
                 "answers": [{"prompt": p, "answer": a} for p, a in zip(prompt_list, answers, strict=True)],
                 "mc": score_mc(model, tokenizer, subset, batch_size) if subset is not None else None,
                 "seconds": round(time.perf_counter() - started, 3), "settings": settings}
        write_json_atomic(path, score)
        scores.append(score)
        tqdm.write(f"{point.name}: ppl {result.ppl:.4f}, bits/char {result.bits_per_char:.5f}", file=sys.stderr)

    plots = plot_curves(scores, out)
    print(f"wrote {write_text_atomic(out / 'index.html', render_html(run_dir, scores, plots, settings))}")
    return scores
