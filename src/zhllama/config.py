"""Typed configs: dataclasses loaded from the YAML recipes shipped in zhllama/recipes/ and overridden by flags.

Each setting is declared once, as a field. A field made with ``option(...)`` is also a command-line flag: the CLI
derives the option (name, type, help, default shown) and the override dict from the field (zhllama.cli.options),
so a setting is never written a second time in the CLI.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from zhllama.errors import ZhllamaError

RECIPES = "recipes"  # the package folder of recipes and engine configs


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line."""

    names: tuple[str, ...]  # e.g. ("--max-steps",) or ("--packing/--no-packing",)
    help: str | None = None
    # Boolean shortcuts that set this field to a value: {"--lora": "lora"} for `trainable`.
    shortcuts: tuple[tuple[str, str, str], ...] = ()  # (flag, value, help)
    also_sets: tuple[str, ...] = ()  # further fields the flag sets to the same value


def option(default=dataclasses.MISSING, *, flag: str | None = None, help: str | None = None,
           default_factory=dataclasses.MISSING, shortcuts=(), also_sets=()):
    """A config field that is also a flag (``flag`` defaults to the field name, --like-this)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"flag": Flag((flag,) if flag else (), help, tuple(shortcuts), tuple(also_sets))})


def flag_of(f: dataclasses.Field) -> Flag | None:
    found = f.metadata.get("flag")
    if found is None:
        return None
    return found if found.names else dataclasses.replace(found, names=("--" + f.name.replace("_", "-"),))


def rope_option():  # a field of both LoadConfig and TrainConfig, one flag
    return option(None, help="RoPE scaling: linear|dynamic|yarn|llama3")


def rope_factor_option():
    return option(None, help="context extension factor (> 1)")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # After a vocabulary extension the new rows must learn too, so they train in full beside the adapter.
    train_embeddings: bool = True


@dataclass
class LoadConfig:
    """How a model is loaded for generation or scoring (every command that runs a model)."""

    template: str | None = option(None, help="atom|llama2|chatml|llama3, if the model has no chat_template of its own")
    device: str = option("auto", help="auto|cpu|cuda")
    quantize: str | None = option(None, help="int8|int4 (GPU: bitsandbytes; CPU: int8 dynamic)")
    rope: str | None = rope_option()
    rope_factor: float | None = rope_factor_option()


@dataclass
class ServeConfig(LoadConfig):
    """`zhllama serve`: the model, the listening socket, and the limits that keep the server answering."""

    model_dir: Path | None = None
    host: str = option("127.0.0.1", help="0.0.0.0 exposes the server to the network")
    port: int = option(8000)
    api_keys: tuple[str, ...] = option((), flag="--api-key", help="required bearer token (repeatable)")
    max_concurrency: int = option(16, help="requests decoded together")
    max_tokens_limit: int = option(2048, help="largest max_tokens accepted")
    default_max_tokens: int = 512
    max_body_bytes: int = option(1_000_000)
    name: str | None = option(None, help="model id in the API")
    backend: str = option("auto", help="auto (by the file) | hf (continuous batching) | llamacpp (a GGUF file)")
    max_queue: int = option(64, help="requests waiting for a slot; beyond it, 429")
    queue_timeout: float = option(60.0, help="seconds a request may wait for a slot; then 503")
    allow_origins: tuple[str, ...] = option((), flag="--allow-origin",
                                            help="browser origin, besides the server's own, that may POST")
    # seconds to send a request's headers, and its body: one flag sets both
    header_timeout: float = option(20.0, flag="--read-timeout", help="seconds to send headers, and the body",
                                   also_sets=("body_timeout",))
    body_timeout: float = 20.0
    max_connections: int = option(256, help="open connections; beyond, 503")


@dataclass
class TrainConfig:
    max_steps: int = option(200)
    batch_size: int = option(8, help="sequences per process per micro-step")
    grad_accum: int = option(1)
    lr: float = option(3e-4)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seq_len: int | None = option(None, help="tokens per row (default: the packed data's)")
    save_every: int = option(100)
    keep_checkpoints: int = 2
    eval_every: int = option(50)
    eval_batches: int = 16
    log_every: int = 10
    seed: int = option(0)
    # auto = bf16 where it is faster (GPU, CPUs with AVX512-BF16)
    precision: str = option("auto", help="auto|bf16|fp32 (auto: bf16 where it is faster)")
    # torch.compile the model's forward (nn.Module.compile: the weights' names, in checkpoints and final/, stay as
    # they are). Compiling takes 12-77 s at the start, and on a CPU the compiled tiny model was slower per step
    # (benchmarks/results/pretrain_throughput_compile.md), so off by default.
    compile: bool = option(False, flag="--compile/--no-compile",
                           help="torch.compile the model (long runs; compiling takes minutes first)")
    # all | embeddings (embed_tokens + lm_head) | new-rows (only their rows that `model extend-vocab` added) |
    # lora (LoRA adapters, see lora.train_embeddings) | qlora (LoRA on a 4-bit NF4 base; CUDA GPU and bitsandbytes)
    trainable: str = option("all", help="all|embeddings|new-rows|lora|qlora (new-rows: only the rows a vocabulary "
                            "extension added; QLoRA: CUDA GPU only)", shortcuts=(
        ("--lora", "lora", "train LoRA adapters instead of all weights (--trainable lora)"),
        ("--qlora", "qlora", "LoRA on a 4-bit NF4 base, CUDA GPU only (--trainable qlora)")))
    # Restart positions at each document start inside a block; attention then stays inside each document (the
    # span attention of train/varlen.py) and no document learns to predict the next one's first token.
    # None: follow the data, on when it was packed with --doc-boundaries; true or false overrides it.
    reset_position_ids: bool | None = None
    # `train pretrain --data A:0.8 --data B:0.2`: when a source runs out before the run ends, repeat it (in a new
    # order; every block of every source is then seen) or stop the run when the first source is exhausted.
    mix_exhausted: str = "repeat"
    # The loss a chunk of target positions at a time (zhllama.linear_ce): the [tokens, vocab] logits are never built
    # whole, with the same loss and gradients. Off: the plain projection, for comparison.
    chunked_loss: bool = option(True, flag="--chunked-loss/--no-chunked-loss",
                                help="never build the full logits (same loss and gradients, less memory)")
    # RoPE scaling applied to the model before training (linear | dynamic | yarn | llama3, with a factor > 1), so
    # the context it is trained at, and the saved config, carry the stretched positions.
    rope: str | None = rope_option()
    rope_factor: float | None = rope_factor_option()
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class SftConfig(TrainConfig):
    """Supervised fine-tuning: the pretraining settings plus what turns conversations into batches."""

    template: str | None = option(None, help="atom|llama2|chatml|llama3 (required, from the recipe or this flag)")
    seq_len: int | None = option(1024, help="tokens per row; longer conversations lose their oldest turns")
    packing: bool = option(True, flag="--packing/--no-packing", help="several conversations per row")
    train_on_prompt: bool = option(False, flag="--train-on-prompt/--mask-prompt",
                                   help="loss on the prompts too (default: replies only)")
    val_fraction: float = 0.02  # conversations held out for the validation loss
    # Packed pretraining blocks mixed into SFT (loss on every token of them), against forgetting: "DIR:FRACTION"
    replay: str | None = option(None, help="DIR:FRACTION: that share of rows are blocks of packed pretraining data")
    lr: float = option(2e-5)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = option(50)


@dataclass
class DpoConfig(TrainConfig):
    """Preference training (`train dpo`): the training settings plus the pairs' template and the loss."""

    template: str | None = option(None, help="atom|llama2|chatml|llama3 (required, from the recipe or this flag); "
                                  "prompts render as SFT renders them")
    seq_len: int | None = option(1024, help="tokens per side (prompt + reply); longer pairs lose their oldest turns")
    loss: str = option("dpo", help="dpo|orpo|simpo (orpo and simpo need no reference model)")
    beta: float | None = option(None, help="the loss's beta (default: dpo 0.1, orpo 0.1, simpo 2.0)")
    gamma: float = option(0.5, help="SimPO's target reward margin")
    label_smoothing: float = 0.0  # conservative DPO / SimPO: the share of pairs assumed to be mislabelled
    val_fraction: float = 0.05  # pairs held out for the validation loss and reward accuracy
    lr: float = option(5e-6)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = option(50)


@dataclass
class CleanConfig:
    """`zhllama data clean`: filter thresholds and deduplication."""

    min_chars: int = option(20, help="non-whitespace characters")
    # Han characters among letters and digits: "is this Chinese at all"
    min_cjk_share: float = option(0.3, help="Han characters among letters and digits")
    max_symbol_share: float = 0.3  # symbols (★, #, emoji, private use) among non-whitespace characters
    max_dup_line_share: float = 0.3  # Gopher: lines that repeat an earlier line ...
    max_dup_line_char_share: float = 0.2  # ... and the characters in them
    # Gopher's repetition rules, on characters (Chinese has no spaces to count words by). Measured on
    # shared/data/pretrain_zh (wiki, news, laws, abstracts, app blurbs, reviews): Gopher's top 2/3/4-gram
    # limits work as they are on character n-grams (at most 1% of any source goes: keyword-stuffed blurbs,
    # name lists, spam). Its duplicate 5..10-gram limits (0.15..0.10) do not: Chinese repeats long names and
    # set phrases (全国人民代表大会常务委员会 is 11 characters), and they would drop 357 of 359 laws and a
    # quarter of all documents over 500 characters. Twice the length (about as many words) with limits
    # 0.40..0.30 still catches every doubled article (share ~0.5) and phrase spam (~0.9), and drops at most
    # 0.3% of wiki, news and abstracts. Only documents of `ngram_min_chars` or more are judged: in a short
    # text one name said twice is already a large share (Gopher only judged documents of 50+ words).
    top_ngram_shares: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_shares: tuple[tuple[int, float], ...] = (
        (10, 0.40), (12, 0.38), (14, 0.36), (16, 0.34), (18, 0.32), (20, 0.30))
    ngram_min_chars: int = 100
    dedup: bool = True
    near_dedup: bool = option(True, flag="--near-dedup/--no-near-dedup", help="MinHash near-duplicate removal")
    # Jaccard similarity of 5-character shingles. A copy with a fraction e of its characters edited at random
    # keeps about (1-e)^5 of its shingles, so J ~ (1-e)^5 / (2 - (1-e)^5): 0.8 would only catch copies with
    # under 2.5% edited; 0.5 catches up to about 8% while unrelated Chinese documents stay under 0.05.
    near_dup_threshold: float = option(0.5, help="Jaccard similarity above which a document is a near copy")
    num_perm: int = 128
    shingle: int = 5
    workers: int | None = option(None, help="processes (default: all cores)")
    chunk_lines: int = 256  # lines per task sent to a worker


def _coerce(kind, value, name: str):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        return None if value is None else _coerce(options[0], value, name)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ZhllamaError(f"config field {name!r} must be a mapping")
        return from_dict(kind, value, prefix=f"{name}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ZhllamaError(f"config field {name!r} must be a list")
        args = typing.get_args(kind)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [_coerce(args[0], v, f"{name}[{i}]") if args else v for i, v in enumerate(value)]
        elif len(args) != len(value):
            raise ZhllamaError(f"config field {name!r} must have {len(args)} items, not {len(value)}")
        else:
            items = [_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
        return list(items) if origin is list else tuple(items)
    if kind is bool and not isinstance(value, bool):
        raise ZhllamaError(f"config field {name!r} must be true or false, not {value!r}")
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ZhllamaError(f"config field {name!r} must be a number, not {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ZhllamaError(f"config field {name!r} must be a whole number, not {value!r}")
    if kind is str and not isinstance(value, str):
        raise ZhllamaError(f"config field {name!r} must be text, not {value!r}")
    return kind(value)


def from_dict(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ZhllamaError(f"unknown config field {prefix}{unknown[0]!r}; known: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in values.items()})


def recipe_files() -> list[Path]:
    """Every file shipped in zhllama/recipes: recipes (.yaml) and engine configs (accelerate, DeepSpeed)."""
    folder = Path(str(resources.files("zhllama") / RECIPES))
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".json"))


def recipe_names() -> list[str]:
    """The shipped recipes, by name (file name without .yaml)."""
    return [p.stem for p in recipe_files() if p.suffix == ".yaml"]


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path as it is, otherwise a shipped recipe by name (``sft_lora``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent == Path("."):
        for shipped in recipe_files():
            if path.name in (shipped.stem, shipped.name) and shipped.suffix == ".yaml":
                return shipped
    raise ZhllamaError(f"{name_or_path}: no such recipe file, and no shipped recipe of that name "
                       f"(shipped: {', '.join(recipe_names())})")


def read_recipe(path: str | Path) -> dict:
    path = recipe_path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ZhllamaError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZhllamaError(f"{path}: cannot read the recipe ({exc})") from None
    if not isinstance(values, dict):
        raise ZhllamaError(f"{path}: a recipe must be a mapping of field: value")
    return values


def load_config(cls, recipe: str | Path | None = None, overrides: dict | None = None):
    """Defaults, then the YAML recipe (a path or a shipped recipe's name), then flags that were given (None means
    not given)."""
    values = read_recipe(recipe) if recipe is not None else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, values)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
