"""Commands that prepare: tokenizer, model, data, convert."""

from __future__ import annotations

from pathlib import Path

import typer

from zhllama.cli.apps import convert_app, data_app, model_app, tokenizer_app
from zhllama.cli.options import Inputs, Recipe, config_options
from zhllama.config import CleanConfig


@tokenizer_app.command("from-gguf")
def tokenizer_from_gguf(gguf_file: Path = typer.Argument(..., help="GGUF vocabulary: SentencePiece (Llama-2) or "
                                                                   "byte-level BPE (Llama-3, Qwen2, ...)"),
                        out: Path = typer.Option(..., "--out")):
    """Rebuild an HF tokenizer folder (and tokenizer.model for SentencePiece) from a GGUF vocabulary."""
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
                    add: Path = typer.Option(..., "--add", help="Chinese SentencePiece model, or for a byte-level "
                                                                "BPE base another byte-level tokenizer.json"),
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
def tokenizer_stats(tokenizer_: Inputs = typer.Option(..., "--tokenizer",
                                                      help="HF folders, tokenizer.model or GGUF vocabulary files"),
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
def model_init(preset: str = typer.Option(..., "--preset", help="tiny|small|1b|7b|llama3-1b|llama3-8b"),
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
@config_options(CleanConfig)
def data_clean(input: Inputs = typer.Option(..., "--input", help=".jsonl (`text` field) or .txt files"),
               out: Path = typer.Option(..., "--out", help="cleaned JSONL"),
               report: Path = typer.Option(..., "--report", help="JSON report of what was kept and dropped"),
               config: Recipe = None, *, overrides: dict):
    """Normalise, filter (length, CJK share, Gopher repetition rules, symbols) and deduplicate."""
    from zhllama.config import load_config
    from zhllama.data.clean import clean_files, summary_line

    typer.echo(summary_line(clean_files(input, out, report, load_config(CleanConfig, config, overrides))))


@data_app.command("pack")
def data_pack(tokenizer_: Path = typer.Option(..., "--tokenizer"), input: Inputs = typer.Option(..., "--input"),
              seq_len: int = typer.Option(..., "--seq-len"), out: Path = typer.Option(..., "--out"),
              val_fraction: float = typer.Option(0.0, "--val-fraction"),
              doc_boundaries: bool = typer.Option(False, "--doc-boundaries")):
    """Tokenize documents (BOS ... EOS) into fixed-length blocks in memory-mapped shards."""
    from zhllama.data.pack import pack

    typer.echo(pack(tokenizer_, input, seq_len, out, val_fraction=val_fraction, doc_boundaries=doc_boundaries))


@model_app.command("memory")
def model_memory(model_dir: str = typer.Option(..., "--model",
                                               help="HF folder, or a preset: tiny|small|1b|7b|llama3-1b|llama3-8b"),
                 batch_size: int = typer.Option(None, "--batch-size", help="also estimate full training at this "
                                                "batch (sequences per process)"),
                 seq_len: int = typer.Option(2048, "--seq-len", help="tokens per sequence, for the training estimate")):
    """Expected memory per precision (fp16, int8, int4, GGUF types) for the model's shape; with --batch-size,
    what full training takes (weights, gradients, AdamW, activations, logits with and without chunking)."""
    from zhllama.model.memory import memory_report

    typer.echo(memory_report(model_dir, batch_size, seq_len))


@convert_app.command("meta")
def convert_meta(input: Path = typer.Option(..., "--input", help="folder with consolidated.*.pth and params.json"),
                 out: Path = typer.Option(..., "--out")):
    """Convert Meta's original Llama checkpoint (sharded or not) and tokenizer.model into an HF folder."""
    from zhllama.model.meta import convert_meta as convert

    typer.echo(convert(input, out))
