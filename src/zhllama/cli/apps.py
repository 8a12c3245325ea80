"""The `zhllama` command groups; the command modules add their commands to them."""

import typer

app = typer.Typer(help="Make Llama-family models fluent in Chinese.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
tokenizer_app = typer.Typer(help="Chinese vocabulary: from-gguf, train, merge, extend, stats.", no_args_is_help=True)
model_app = typer.Typer(help="Models: init (random presets), extend-vocab, memory.", no_args_is_help=True)
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
