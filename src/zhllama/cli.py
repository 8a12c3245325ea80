"""The `zhllama` command: parses flags and calls one library function per command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from zhllama.errors import ZhllamaError

app = typer.Typer(help="Make Llama-family models fluent in Chinese.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
tokenizer_app = typer.Typer(help="Chinese vocabulary: from-gguf, train, merge, extend, stats.", no_args_is_help=True)
model_app = typer.Typer(help="Models: init (random presets), extend-vocab.", no_args_is_help=True)
data_app = typer.Typer(help="Corpora: clean (filter, dedup) and pack (tokenize into blocks).", no_args_is_help=True)
train_app = typer.Typer(help="Training: continued pretraining and SFT.", no_args_is_help=True)
lora_app = typer.Typer(help="LoRA adapters: merge into a standalone model.", no_args_is_help=True)
convert_app = typer.Typer(help="Checkpoint conversion: Meta's original format to HF.", no_args_is_help=True)
export_app = typer.Typer(help="Export: GGUF for llama.cpp (f32, f16, q8_0, q4_0).", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluation: mc (C-Eval, CMMLU), ppl, qa, track, long.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(lora_app, name="lora")
app.add_typer(convert_app, name="convert")
app.add_typer(eval_app, name="eval")
app.add_typer(export_app, name="export")

# Options that take several values (`--input a.jsonl b.jsonl`, as a shell glob gives them).
MULTI_VALUE_OPTIONS = {"--input", "--tokenizer", "--zh", "--en", "--code", "--name", "--data", "--adapter",
                       "--subjects"}


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """Rewrite `--input a b` as `--input a --input b`, which is what click understands."""
    out, current = [], None
    for arg in argv:
        if arg.startswith("-"):
            current = arg if arg in MULTI_VALUE_OPTIONS else None
            out.append(arg)
        elif current and out[-1] != current:
            out.extend([current, arg])
        else:
            out.append(arg)
    return out


Inputs = list[Path]


@tokenizer_app.command("from-gguf")
def tokenizer_from_gguf(gguf_file: Path = typer.Argument(..., help="GGUF file with an SPM ('llama') vocabulary"),
                        out: Path = typer.Option(..., "--out")):
    """Rebuild tokenizer.model and an HF tokenizer folder from a GGUF vocabulary."""
    from zhllama import tokenizer

    typer.echo(tokenizer.from_gguf(gguf_file, out))


@tokenizer_app.command("train")
def tokenizer_train(input: Inputs = typer.Option(..., "--input", help=".txt or .jsonl (`text` field) files"),
                    vocab_size: int = typer.Option(..., "--vocab-size"), out: Path = typer.Option(..., "--out"),
                    standalone: bool = typer.Option(False, "--standalone",
                                                    help="a complete bilingual tokenizer from scratch")):
    """Train a Chinese SentencePiece BPE model."""
    from zhllama import tokenizer

    typer.echo(tokenizer.train(input, vocab_size, out, standalone=standalone))


@tokenizer_app.command("merge")
def tokenizer_merge(base: Path = typer.Option(..., "--base", help="Llama tokenizer.model or HF folder"),
                    add: Path = typer.Option(..., "--add", help="Chinese SentencePiece model"),
                    out: Path = typer.Option(..., "--out"),
                    scheme: str = typer.Option("zh-rank", "--scheme",
                                               help="scores of new pieces: zh-rank|append|zero")):
    """Append the new pieces after the base ones; every base id, score and type is kept."""
    from zhllama import tokenizer

    typer.echo(tokenizer.merge(base, add, out, scheme=scheme))


@tokenizer_app.command("extend")
def tokenizer_extend(base: Path = typer.Option(..., "--base"), input: Inputs = typer.Option(..., "--input"),
                     vocab_size: int = typer.Option(..., "--vocab-size", help="total size of the result"),
                     out: Path = typer.Option(..., "--out"),
                     pad_to_multiple: int = typer.Option(None, "--pad-to-multiple"),
                     scheme: str = typer.Option("zh-rank", "--scheme")):
    """Train on the input and merge, so that the result has exactly --vocab-size pieces."""
    from zhllama import tokenizer

    typer.echo(tokenizer.extend(base, input, vocab_size, out, pad_to_multiple=pad_to_multiple, scheme=scheme))


@tokenizer_app.command("stats")
def tokenizer_stats(tokenizer_: Inputs = typer.Option(..., "--tokenizer", help="HF folders or .model files"),
                    zh: Inputs = typer.Option(None, "--zh"), en: Inputs = typer.Option(None, "--en"),
                    code: Inputs = typer.Option(None, "--code"), json_out: Path = typer.Option(None, "--json"),
                    name: list[str] = typer.Option(None, "--name", help="row labels, one per --tokenizer")):
    """Tokens per character on zh/en/code, speed and round-trip losslessness, one row per tokenizer."""
    from zhllama import tokenizer

    rows = tokenizer.stats(tokenizer_, zh=zh, en=en, code=code, names=name or None)
    typer.echo(tokenizer.format_table(rows))
    if json_out:
        from zhllama.artifacts import write_json_atomic

        write_json_atomic(json_out, tokenizer.stats_as_dicts(rows))


@model_app.command("init")
def model_init(preset: str = typer.Option(..., "--preset", help="tiny|small|1b|7b"),
               tokenizer_: Path = typer.Option(..., "--tokenizer"), out: Path = typer.Option(..., "--out"),
               seed: int = typer.Option(0, "--seed")):
    """Write a randomly initialised LlamaForCausalLM of a named shape."""
    from zhllama import model

    typer.echo(model.init_model(preset, tokenizer_, out, seed=seed))


@model_app.command("extend-vocab")
def model_extend_vocab(model_dir: Path = typer.Option(..., "--model"),
                       tokenizer_: Path = typer.Option(..., "--tokenizer"), out: Path = typer.Option(..., "--out"),
                       init: str = typer.Option("mean", "--init", help="mean|random"),
                       seed: int = typer.Option(0, "--seed")):
    """Resize embed_tokens and lm_head to an extended tokenizer, with informed new rows."""
    from zhllama import model

    typer.echo(model.extend_vocab(model_dir, tokenizer_, out, init=init, seed=seed))


@data_app.command("clean")
def data_clean(input: Inputs = typer.Option(..., "--input", help=".jsonl (`text` field) or .txt files"),
               out: Path = typer.Option(..., "--out", help="cleaned JSONL"),
               report: Path = typer.Option(..., "--report", help="JSON report of what was kept and dropped"),
               workers: int = typer.Option(None, "--workers", help="processes (default: all cores)"),
               min_chars: int = typer.Option(None, "--min-chars"),
               min_cjk_share: float = typer.Option(None, "--min-cjk-share"),
               near_dup_threshold: float = typer.Option(None, "--near-dup-threshold"),
               no_near_dedup: bool = typer.Option(False, "--no-near-dedup")):
    """Normalise, filter (length, CJK share, Gopher repetition rules, symbols) and deduplicate."""
    from zhllama.data.clean import CleanConfig, clean_files, summary_line

    given = {"workers": workers, "min_chars": min_chars, "min_cjk_share": min_cjk_share,
             "near_dup_threshold": near_dup_threshold}
    cfg = CleanConfig(**{k: v for k, v in given.items() if v is not None})
    cfg.near_dedup = not no_near_dedup
    typer.echo(summary_line(clean_files(input, out, report, cfg)))


@data_app.command("pack")
def data_pack(tokenizer_: Path = typer.Option(..., "--tokenizer"), input: Inputs = typer.Option(..., "--input"),
              seq_len: int = typer.Option(..., "--seq-len"), out: Path = typer.Option(..., "--out"),
              val_fraction: float = typer.Option(0.0, "--val-fraction"),
              doc_boundaries: bool = typer.Option(False, "--doc-boundaries")):
    """Tokenize documents (BOS ... EOS) into fixed-length blocks in memory-mapped shards."""
    from zhllama.data.pack import pack

    typer.echo(pack(tokenizer_, input, seq_len, out, val_fraction=val_fraction, doc_boundaries=doc_boundaries))


# Flags of the training loop shared by `train pretrain` and `train sft`; None means "not given, keep the recipe's".
Resume = Annotated[bool, typer.Option("--resume")]
MaxSteps = Annotated[int | None, typer.Option("--max-steps")]
BatchSize = Annotated[int | None, typer.Option("--batch-size")]
GradAccum = Annotated[int | None, typer.Option("--grad-accum")]
Lr = Annotated[float | None, typer.Option("--lr")]
SeqLen = Annotated[int | None, typer.Option("--seq-len")]
SaveEvery = Annotated[int | None, typer.Option("--save-every")]
EvalEvery = Annotated[int | None, typer.Option("--eval-every")]
Seed = Annotated[int | None, typer.Option("--seed")]
Precision = Annotated[str | None, typer.Option("--precision", help="auto|bf16|fp32")]
Quantize = Annotated[str | None, typer.Option("--quantize", help="int8|int4 (GPU: bitsandbytes; CPU: int8 dynamic)")]
Rope = Annotated[str | None, typer.Option("--rope", help="RoPE scaling: linear|dynamic|yarn|llama3")]
RopeFactor = Annotated[float | None, typer.Option("--rope-factor", help="context extension factor (> 1)")]


@train_app.command("pretrain")
def train_pretrain(model_dir: Path = typer.Option(..., "--model"), data: Path = typer.Option(..., "--data"),
                   out: Path = typer.Option(..., "--out"), config: Path = typer.Option(None, "--config"),
                   resume: Resume = False, max_steps: MaxSteps = None, batch_size: BatchSize = None,
                   grad_accum: GradAccum = None, lr: Lr = None, seq_len: SeqLen = None, save_every: SaveEvery = None,
                   eval_every: EvalEvery = None, seed: Seed = None, precision: Precision = None,
                   trainable: str = typer.Option(None, "--trainable",
                                                 help="all|embeddings|lora|qlora (QLoRA: CUDA GPU only)"),
                   rope: Rope = None, rope_factor: RopeFactor = None):
    """Continue pretraining on packed data (launch with torchrun or accelerate launch to distribute)."""
    from zhllama.config import TrainConfig, load_config
    from zhllama.train import pretrain

    cfg = load_config(TrainConfig, config, dict(
        max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, seq_len=seq_len,
        save_every=save_every, eval_every=eval_every, seed=seed, trainable=trainable, precision=precision,
        rope=rope, rope_factor=rope_factor))
    typer.echo(pretrain(model_dir, data, out, cfg, resume=resume))


@train_app.command("sft")
def train_sft(model_dir: Path = typer.Option(..., "--model"),
              data: Inputs = typer.Option(..., "--data", help="seed CSV, Alpaca or ShareGPT .json/.jsonl files"),
              template: str = typer.Option(None, "--template", help="atom|llama2|chatml (or set in the recipe)"),
              out: Path = typer.Option(..., "--out"), config: Path = typer.Option(None, "--config"),
              lora: bool = typer.Option(False, "--lora", help="train LoRA adapters instead of all weights"),
              qlora: bool = typer.Option(False, "--qlora", help="LoRA on a 4-bit NF4 base (CUDA GPU only)"),
              train_on_prompt: bool = typer.Option(None, "--train-on-prompt/--mask-prompt",
                                                   help="loss on the prompts too (default: replies only)"),
              packing: bool = typer.Option(None, "--packing/--no-packing"),
              resume: Resume = False, max_steps: MaxSteps = None, batch_size: BatchSize = None,
              grad_accum: GradAccum = None, lr: Lr = None, seq_len: SeqLen = None, save_every: SaveEvery = None,
              eval_every: EvalEvery = None, seed: Seed = None, precision: Precision = None,
              rope: Rope = None, rope_factor: RopeFactor = None):
    """Supervised fine-tuning on conversations: loss on the replies only, packed rows, full/LoRA/QLoRA."""
    from zhllama.config import SftConfig, load_config
    from zhllama.train import sft

    if lora and qlora:
        raise ZhllamaError("choose one of --lora and --qlora")
    trainable = "qlora" if qlora else "lora" if lora else None
    cfg = load_config(SftConfig, config, dict(
        template=template, train_on_prompt=train_on_prompt, packing=packing, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, seq_len=seq_len, save_every=save_every,
        eval_every=eval_every, seed=seed, trainable=trainable, precision=precision, rope=rope,
        rope_factor=rope_factor))
    typer.echo(sft(model_dir, data, out, cfg, resume=resume))


@lora_app.command("merge")
def lora_merge(base: Path = typer.Option(..., "--base", help="the HF model the adapters were trained on"),
               adapter: Inputs = typer.Option(..., "--adapter", help="peft adapter folders, applied in order"),
               out: Path = typer.Option(..., "--out")):
    """Fold one or more LoRA adapters into the base weights; writes a standalone HF folder."""
    from zhllama.train.lora import merge_adapters

    typer.echo(merge_adapters(base, adapter, out))


@convert_app.command("meta")
def convert_meta(input: Path = typer.Option(..., "--input", help="folder with consolidated.*.pth and params.json"),
                 out: Path = typer.Option(..., "--out")):
    """Convert Meta's original Llama checkpoint (sharded or not) and tokenizer.model into an HF folder."""
    from zhllama.model.meta import convert_meta as convert

    typer.echo(convert(input, out))


Template = Annotated[str | None, typer.Option("--template", help="atom|llama2|chatml, when the model has no "
                                                                   "chat_template of its own")]
Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="most new tokens per reply")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 is greedy")]
TopK = Annotated[int, typer.Option("--top-k", help="0 is off")]
TopP = Annotated[float, typer.Option("--top-p")]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="reproducible sampling (runs unbatched)")]


def _load_options(quantize, rope, rope_factor) -> dict:
    return {"quantize": quantize, "rope": rope, "rope_factor": rope_factor}


def _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop=()):
    from zhllama.infer import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, stop=tuple(stop), seed=seed).check()


@app.command("chat")
def chat(model_dir: Path = typer.Option(..., "--model"), template: Template = None,
         system: str = typer.Option(None, "--system", help="system prompt"), device: Device = "auto",
         max_tokens: MaxTokens = 512, temperature: Temperature = 0.7, top_k: TopK = 0, top_p: TopP = 0.9,
         repetition_penalty: RepetitionPenalty = 1.0, seed: SeedOption = None, quantize: Quantize = None,
         rope: Rope = None, rope_factor: RopeFactor = None):
    """Streaming multi-turn chat in the terminal (/reset, /system TEXT, /exit)."""
    from zhllama.infer import load_engine
    from zhllama.infer.chat import run_chat

    params = _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    engine = load_engine(model_dir, template, device=device, **_load_options(quantize, rope, rope_factor))
    try:
        run_chat(engine, params, system=system)
    finally:
        engine.close()


@app.command("generate")
def generate(model_dir: Path = typer.Option(..., "--model"),
             prompt: str = typer.Option(..., "--prompt", help="one user message"),
             template: Template = None, system: str = typer.Option(None, "--system"), device: Device = "auto",
             raw: bool = typer.Option(False, "--raw", help="continue the text as is, with no chat template"),
             max_tokens: MaxTokens = 256, temperature: Temperature = 0.0, top_k: TopK = 0, top_p: TopP = 1.0,
             repetition_penalty: RepetitionPenalty = 1.0, seed: SeedOption = None,
             stop: list[str] = typer.Option(None, "--stop", help="stop strings (repeatable)"),
             quantize: Quantize = None, rope: Rope = None, rope_factor: RopeFactor = None):
    """One reply, streamed to stdout (greedy by default)."""
    from zhllama.infer import load_engine

    params = _sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop or ())
    engine = load_engine(model_dir, template, device=device, **_load_options(quantize, rope, rope_factor))
    try:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = engine.encode_text(prompt, params) if raw else engine.encode_chat(messages, params)
        for delta in engine.stream(ids, params):
            typer.echo(delta.text, nl=False)
        typer.echo()
    finally:
        engine.close()


@app.command("serve")
def serve(model_dir: Path = typer.Option(..., "--model", help="HF folder, or a .gguf with --backend llamacpp"),
          template: Template = None,
          host: str = typer.Option("127.0.0.1", "--host", help="0.0.0.0 exposes the server to the network"),
          port: int = typer.Option(8000, "--port"),
          api_key: list[str] = typer.Option(None, "--api-key", help="required bearer token (repeatable)"),
          max_concurrency: int = typer.Option(16, "--max-concurrency", help="requests decoded together"),
          max_tokens_limit: int = typer.Option(2048, "--max-tokens-limit", help="largest max_tokens accepted"),
          max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes"),
          max_queue: int = typer.Option(64, "--max-queue", help="requests waiting for a slot; beyond it, 429"),
          queue_timeout: float = typer.Option(60, "--queue-timeout", help="seconds a request may wait; then 503"),
          allow_origin: list[str] = typer.Option(None, "--allow-origin",
                                                 help="browser origin, besides the server's own, that may POST"),
          read_timeout: float = typer.Option(20, "--read-timeout", help="seconds to send headers, and the body"),
          max_connections: int = typer.Option(256, "--max-connections", help="open connections; beyond, 503"),
          device: Device = "auto", name: str = typer.Option(None, "--name", help="model id in the API"),
          backend: str = typer.Option("hf", "--backend", help="hf (continuous batching) | llamacpp (a GGUF file)"),
          quantize: Quantize = None, rope: Rope = None, rope_factor: RopeFactor = None):
    """OpenAI-compatible HTTP API and web chat page, batching concurrent requests."""
    from zhllama.serve import ServeConfig, run_server

    run_server(ServeConfig(model_dir=model_dir, template=template, host=host, port=port,
                           api_keys=tuple(api_key or ()), max_concurrency=max_concurrency,
                           max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes, device=device,
                           name=name, backend=backend, quantize=quantize, rope=rope, rope_factor=rope_factor,
                           max_queue=max_queue, queue_timeout=queue_timeout, allow_origins=tuple(allow_origin or ()),
                           header_timeout=read_timeout, body_timeout=read_timeout, max_connections=max_connections))


@eval_app.command("mc")
def eval_mc(model_dir: Path = typer.Option(..., "--model"),
            task: str = typer.Option(..., "--task", help="ceval|cmmlu"),
            data_dir: Path = typer.Option(..., "--data-dir", help="the benchmark's folder (dev/ val/ test/ CSVs)"),
            split: str = typer.Option("val", "--split", help="val|test|dev"),
            shots: int = typer.Option(5, "--shots", help="0..5 examples from the dev split"),
            subjects: list[str] = typer.Option(None, "--subjects", help="only these subjects"),
            out: Path = typer.Option(None, "--out", help="report JSON (a .md table and prompts/ go beside it)"),
            batch_size: int = typer.Option(8, "--batch-size"), device: Device = "auto", quantize: Quantize = None,
            rope: Rope = None, rope_factor: RopeFactor = None):
    """Multiple-choice accuracy by the log-likelihood of the answer letter, per subject and category."""
    from zhllama.eval.mc import run_mc

    run_mc(model_dir, task, data_dir, split, shots, subjects or None, out, batch_size=batch_size, device=device,
           **_load_options(quantize, rope, rope_factor))


@eval_app.command("ppl")
def eval_ppl(model_dir: Path = typer.Option(..., "--model"),
             data: Inputs = typer.Option(..., "--data", help=".jsonl (`text` field) or .txt files"),
             seq_len: int = typer.Option(None, "--seq-len", help="window (default: the model's context, max 2048)"),
             stride: int = typer.Option(None, "--stride", help="window step (default: seq-len / 2)"),
             out: Path = typer.Option(None, "--out", help="report JSON"), device: Device = "auto",
             quantize: Quantize = None, rope: Rope = None, rope_factor: RopeFactor = None):
    """Sliding-window perplexity and bits per character, per file and overall."""
    from zhllama.eval.ppl import run_ppl

    run_ppl(model_dir, data, seq_len, stride, out, device=device, **_load_options(quantize, rope, rope_factor))


@eval_app.command("qa")
def eval_qa(model_dir: list[Path] = typer.Option(..., "--model", help="repeat for a side-by-side report"),
            questions: Path = typer.Option(..., "--questions", help="AtomBulb question.json, {id, category, "
                                                                   "question} JSONL, or the BELLE eval set"),
            out: Path = typer.Option(..., "--out"), template: Template = None,
            judge_url: str = typer.Option(None, "--judge-url", help="OpenAI-compatible base URL of a judge"),
            judge_model: str = typer.Option(None, "--judge-model"),
            judge_api_key: str = typer.Option(None, "--judge-api-key", envvar="ZHLLAMA_JUDGE_API_KEY"),
            max_tokens: MaxTokens = 512, limit: int = typer.Option(None, "--limit", help="first N questions"),
            device: Device = "auto", quantize: Quantize = None, rope: Rope = None, rope_factor: RopeFactor = None):
    """Answer an open question set; JSONL answers and an HTML report by category, optionally judged."""
    from zhllama.eval.qa import run_qa

    run_qa(model_dir, questions, out, template=template, judge_url=judge_url, judge_model=judge_model,
           judge_api_key=judge_api_key, max_tokens=max_tokens, limit=limit, device=device,
           **_load_options(quantize, rope, rope_factor))


@eval_app.command("track")
def eval_track(run_dir: Path = typer.Option(..., "--run"),
               every: int = typer.Option(1, "--every", help="every K-th checkpoint"),
               data: Inputs = typer.Option(None, "--data", help="held-out text (default: the built-in held-out)"),
               prompts: Path = typer.Option(None, "--prompts", help="fixed prompts, one per line or JSONL"),
               mc_data_dir: Path = typer.Option(None, "--mc-data-dir", help="a CMMLU folder for an mc subset"),
               out: Path = typer.Option(None, "--out", help="default: RUN/track"), device: Device = "auto"):
    """Score every checkpoint of a run (resumable) and render one HTML page of curves and answers."""
    from zhllama.eval.track import run_track

    run_track(run_dir, every=every, data=data or None, prompts=prompts, mc_data_dir=mc_data_dir, out=out,
              device=device)


@eval_app.command("long")
def eval_long(model_dir: Path = typer.Option(..., "--model"),
              lengths: str = typer.Option("1k,2k,4k,8k", "--lengths"),
              rope: str = typer.Option(None, "--rope", help="linear|dynamic|yarn|llama3"),
              factor: float = typer.Option(None, "--factor"), out: Path = typer.Option(None, "--out"),
              device: Device = "auto"):
    """Passkey retrieval and perplexity against context length, optionally with RoPE scaling."""
    from zhllama.eval.long import run_long

    run_long(model_dir, lengths, rope=rope, factor=factor, out=out, device=device)


@export_app.command("gguf")
def export_gguf(model_dir: Path = typer.Option(..., "--model", help="HF model folder"),
                out: Path = typer.Option(..., "--out", help="FILE.gguf"),
                type_: str = typer.Option("f16", "--type", help="f32|f16|q8_0|q4_0"),
                pad_vocab: int = typer.Option(None, "--pad-vocab", help="pad the vocabulary to a multiple of N")):
    """A llama-architecture GGUF for llama.cpp: weights, SentencePiece vocabulary, chat template, RoPE."""
    from zhllama.export.gguf import export_gguf as export

    typer.echo(export(model_dir, out, type_, pad_vocab=pad_vocab))


@model_app.command("memory")
def model_memory(model_dir: str = typer.Option(..., "--model", help="HF folder, or a preset: tiny|small|1b|7b")):
    """Expected memory per precision (fp16, int8, int4, GGUF types) for the model's shape."""
    from zhllama.model.memory import memory_report

    typer.echo(memory_report(model_dir))


@app.command("demo")
def demo(out: Path = typer.Option(Path("demo-run"), "--out", help="folder for everything the demo makes"),
         quick: bool = typer.Option(False, "--quick", help="smaller corpus and vocabulary, for tests")):
    """The whole road on the built-in corpus."""
    from zhllama.demo import run_demo

    run_demo(out, quick=quick)


def main(argv: list[str] | None = None) -> None:
    args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, prog_name="zhllama")
    except ZhllamaError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        # Backstop for a file the library did not word an error for (outputs go through zhllama.artifacts,
        # which does): the path and the reason in one line. An OSError that names no file is a bug: traceback.
        if exc.filename is None:
            raise
        typer.echo(f"error: {exc.filename}: {exc.strerror or exc}", err=True)
        sys.exit(1)
