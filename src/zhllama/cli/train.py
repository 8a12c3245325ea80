"""Commands that train: train pretrain, train sft, train dpo, lora merge, and the recipes they read."""

from __future__ import annotations

from pathlib import Path

import typer

from zhllama.cli.apps import app, lora_app, train_app
from zhllama.cli.options import Inputs, Model, Out, Recipe, Resume, config_options
from zhllama.config import DpoConfig, SftConfig, TrainConfig


@train_app.command("pretrain")
@config_options(TrainConfig)
def train_pretrain(model_dir: Model,
                   data: Inputs = typer.Option(..., "--data", help="folders from `data pack`, each DIR or DIR:WEIGHT "
                                               "to mix them by weight (the same tokenizer and --seq-len)"),
                   out: Out = ..., config: Recipe = None, resume: Resume = False, *, overrides: dict):
    """Continue pretraining on packed data (launch with torchrun or accelerate launch to distribute)."""
    from zhllama.config import load_config
    from zhllama.train import pretrain

    typer.echo(pretrain(model_dir, data, out, load_config(TrainConfig, config, overrides), resume=resume))


@train_app.command("sft")
@config_options(SftConfig)
def train_sft(model_dir: Model,
              data: Inputs = typer.Option(..., "--data", help="seed CSV, Alpaca or ShareGPT .json/.jsonl files, "
                                          "each FILE or FILE:WEIGHT to mix them by weight"),
              out: Out = ..., config: Recipe = None, resume: Resume = False, *, overrides: dict):
    """Supervised fine-tuning on conversations: loss on the replies only, packed rows, full/LoRA/QLoRA."""
    from zhllama.config import load_config
    from zhllama.train import sft

    typer.echo(sft(model_dir, data, out, load_config(SftConfig, config, overrides), resume=resume))


@train_app.command("dpo")
@config_options(DpoConfig)
def train_dpo(model_dir: Model,
              data: Inputs = typer.Option(..., "--data", help="preference pairs: LLaMA-Factory's format "
                                          "(conversations + chosen + rejected) or Alpaca-style .json/.jsonl files"),
              out: Out = ..., config: Recipe = None, resume: Resume = False, *, overrides: dict):
    """Preference training (DPO, ORPO, SimPO) on chosen/rejected replies, after SFT; full or LoRA."""
    from zhllama.config import load_config
    from zhllama.train.dpo import dpo

    typer.echo(dpo(model_dir, data, out, load_config(DpoConfig, config, overrides), resume=resume))


@lora_app.command("merge")
def lora_merge(base: Path = typer.Option(..., "--base", help="the HF model the adapters were trained on"),
               adapter: Inputs = typer.Option(..., "--adapter", help="peft adapter folders, applied in order"),
               out: Out = ...):
    """Fold one or more LoRA adapters into the base weights; writes a standalone HF folder."""
    from zhllama.train.lora_merge import merge_adapters

    typer.echo(merge_adapters(base, adapter, out))


@app.command("recipes")
def recipes(name: str = typer.Argument(None, help="print only this one's path (for accelerate's --config_file)")):
    """The shipped recipes (for --config NAME) and engine configs (for accelerate launch), with their paths."""
    from zhllama.config import recipe_files

    files = recipe_files()
    if name is not None:
        from zhllama.errors import ZhllamaError

        found = next((p for p in files if name in (p.stem, p.name)), None)
        if found is None:
            raise ZhllamaError(f"no shipped recipe {name!r}; `zhllama recipes` lists them")
        typer.echo(found)
        return
    for path in files:
        typer.echo(f"{path.stem:28} {path}")
