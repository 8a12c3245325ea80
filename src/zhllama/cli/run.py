"""Commands that run a model: chat, generate, serve, eval, export, and the demo."""

from __future__ import annotations

from pathlib import Path

import typer

from zhllama.cli.apps import app, eval_app, export_app
from zhllama.cli.options import (
    Inputs,
    MaxTokens,
    Model,
    RepetitionPenalty,
    SamplingSeed,
    Temperature,
    TopK,
    TopP,
    config_options,
)
from zhllama.config import LoadConfig, ServeConfig, load_config

AnyModel = typer.Option(..., "--model", help="HF model folder, or a .gguf file (run by llama.cpp)")
NO_TEMPLATE = ("device", "quantize", "rope", "rope_factor")  # what scoring commands load with


def _loading(overrides: dict, names: tuple[str, ...] | None = None) -> dict:
    """The model-loading settings (all, or ``names``) as keywords for zhllama.infer.load_engine and the evals."""
    settings = vars(load_config(LoadConfig, None, overrides))
    return {name: settings[name] for name in names or settings}


def _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop=()):
    from zhllama.infer import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, stop=tuple(stop), seed=seed).check()


@app.command("chat")
@config_options(LoadConfig)
def chat(model_dir: Path = AnyModel, system: str = typer.Option(None, "--system", help="system prompt"),
         max_tokens: MaxTokens = 512, temperature: Temperature = 0.7, top_k: TopK = 0, top_p: TopP = 0.9,
         repetition_penalty: RepetitionPenalty = 1.0, seed: SamplingSeed = None, *, overrides: dict):
    """Streaming multi-turn chat in the terminal (/reset, /system TEXT, /exit)."""
    from zhllama.infer import load_engine
    from zhllama.infer.chat import run_chat

    params = _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    engine = load_engine(model_dir, **_loading(overrides))
    try:
        run_chat(engine, params, system=system)
    finally:
        engine.close()


@app.command("generate")
@config_options(LoadConfig)
def generate(model_dir: Path = AnyModel, prompt: str = typer.Option(..., "--prompt", help="one user message"),
             system: str = typer.Option(None, "--system"),
             raw: bool = typer.Option(False, "--raw", help="continue the text as is, with no chat template"),
             max_tokens: MaxTokens = 256, temperature: Temperature = 0.0, top_k: TopK = 0, top_p: TopP = 1.0,
             repetition_penalty: RepetitionPenalty = 1.0, seed: SamplingSeed = None,
             stop: list[str] = typer.Option(None, "--stop", help="stop strings (repeatable)"), *, overrides: dict):
    """One reply, streamed to stdout (greedy by default)."""
    from zhllama.infer import load_engine

    params = _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop or ())
    engine = load_engine(model_dir, **_loading(overrides))
    try:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = engine.encode_text(prompt, params) if raw else engine.encode_chat(messages, params)
        for delta in engine.stream(ids, params):
            typer.echo(delta.text, nl=False)
        typer.echo()
    finally:
        engine.close()


@app.command("serve")
@config_options(ServeConfig)
def serve(model_dir: Path = AnyModel, *, overrides: dict):
    """OpenAI-compatible HTTP API and web chat page, batching concurrent requests."""
    from zhllama.serve import run_server

    run_server(load_config(ServeConfig, None, {**overrides, "model_dir": model_dir}))


@eval_app.command("mc")
@config_options(LoadConfig, only=NO_TEMPLATE)
def eval_mc(model_dir: Model, task: str = typer.Option(..., "--task", help="ceval|cmmlu|mmlu"),
            data_dir: Path = typer.Option(..., "--data-dir", help="the benchmark's folder (dev/ val/ test/ CSVs)"),
            split: str = typer.Option("val", "--split", help="val|test|dev"),
            shots: int = typer.Option(5, "--shots", help="0..5 examples from the dev split"),
            subjects: list[str] = typer.Option(None, "--subjects", help="only these subjects"),
            out: Path = typer.Option(None, "--out", help="report JSON (a .md table and prompts/ go beside it)"),
            batch_size: int = typer.Option(8, "--batch-size"), *, overrides: dict):
    """Multiple-choice accuracy by the log-likelihood of the answer letter, per subject and category."""
    from zhllama.eval.mc import run_mc

    run_mc(model_dir, task, data_dir, split, shots, subjects or None, out, batch_size=batch_size,
           **_loading(overrides, NO_TEMPLATE))


@eval_app.command("ppl")
@config_options(LoadConfig, only=NO_TEMPLATE)
def eval_ppl(model_dir: Model, data: Inputs = typer.Option(..., "--data", help=".jsonl (`text` field) or .txt files"),
             seq_len: int = typer.Option(None, "--seq-len", help="window (default: the model's context, max 2048)"),
             stride: int = typer.Option(None, "--stride", help="window step (default: seq-len / 2)"),
             out: Path = typer.Option(None, "--out", help="report JSON"), *, overrides: dict):
    """Sliding-window perplexity and bits per character, per file and overall."""
    from zhllama.eval.ppl import run_ppl

    run_ppl(model_dir, data, seq_len, stride, out, **_loading(overrides, NO_TEMPLATE))


@eval_app.command("qa")
@config_options(LoadConfig)
def eval_qa(model_dir: list[Path] = typer.Option(..., "--model", help="repeat (or list) for a side-by-side report"),
            questions: Path = typer.Option(..., "--questions", help="AtomBulb question.json, {id, category, "
                                                                   "question} JSONL, or the BELLE eval set"),
            out: Path = typer.Option(..., "--out"),
            judge_url: str = typer.Option(None, "--judge-url", help="OpenAI-compatible base URL of a judge"),
            judge_model: str = typer.Option(None, "--judge-model"),
            judge_api_key: str = typer.Option(None, "--judge-api-key", envvar="ZHLLAMA_JUDGE_API_KEY"),
            max_tokens: MaxTokens = 512, limit: int = typer.Option(None, "--limit", help="first N questions"),
            *, overrides: dict):
    """Answer an open question set; JSONL answers and an HTML report by category, optionally judged."""
    from zhllama.eval.qa import run_qa

    run_qa(model_dir, questions, out, judge_url=judge_url, judge_model=judge_model, judge_api_key=judge_api_key,
           max_tokens=max_tokens, limit=limit, **_loading(overrides))


@eval_app.command("track")
@config_options(LoadConfig, only=("device",))
def eval_track(run_dir: Path = typer.Option(..., "--run"),
               every: int = typer.Option(1, "--every", help="every K-th checkpoint"),
               data: Inputs = typer.Option(None, "--data", help="held-out text (default: the built-in held-out)"),
               prompts: Path = typer.Option(None, "--prompts", help="fixed prompts, one per line or JSONL"),
               mc_data_dir: Path = typer.Option(None, "--mc-data-dir", help="a CMMLU folder for an mc subset"),
               out: Path = typer.Option(None, "--out", help="default: RUN/track"), *, overrides: dict):
    """Score every checkpoint of a run (resumable) and render one HTML page of curves and answers."""
    from zhllama.eval.track import run_track

    run_track(run_dir, every=every, data=data or None, prompts=prompts, mc_data_dir=mc_data_dir, out=out,
              device=_loading(overrides)["device"])


@eval_app.command("long")
@config_options(LoadConfig, only=("device", "rope", "rope_factor"))
def eval_long(model_dir: Model, lengths: str = typer.Option("1k,2k,4k,8k", "--lengths"),
              out: Path = typer.Option(None, "--out"), *, overrides: dict):
    """Passkey retrieval and perplexity against context length, optionally with RoPE scaling."""
    from zhllama.eval.long import run_long

    loading = _loading(overrides)
    run_long(model_dir, lengths, rope=loading["rope"], factor=loading["rope_factor"], out=out,
             device=loading["device"])


@export_app.command("gguf")
def export_gguf(model_dir: Model, out: Path = typer.Option(..., "--out", help="FILE.gguf"),
                type_: str = typer.Option("f16", "--type", help="f32|f16|q8_0|q4_0"),
                pad_vocab: int = typer.Option(None, "--pad-vocab", help="pad the vocabulary to a multiple of N")):
    """A llama-architecture GGUF for llama.cpp: weights, SentencePiece vocabulary, chat template, RoPE."""
    from zhllama.export.gguf import export_gguf as export

    typer.echo(export(model_dir, out, type_, pad_vocab=pad_vocab))


@app.command("demo")
def demo(out: Path = typer.Option(Path("demo-run"), "--out", help="folder for everything the demo makes"),
         quick: bool = typer.Option(False, "--quick", help="smaller corpus and vocabulary, for tests"),
         base: str = typer.Option("llama2", "--base", help="the vocabulary to start from: llama2|llama3")):
    """The whole road on the built-in corpus."""
    from zhllama.demo import run_demo

    run_demo(out, quick=quick, base=base)
