"""Supervised fine-tuning: conversations in, through the same loop as pretraining, a chat model out.

The data is read (seed CSV, Alpaca, ShareGPT), rendered with a chat template, tokenized with loss masks on the
assistant replies, and packed several conversations per row. The saved model's tokenizer carries the template as
its ``chat_template``, so serving builds exactly the prompts that training saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from zhllama import scoring
from zhllama.artifacts import file_sha256, make_dir, write_json_atomic, write_provenance
from zhllama.config import SftConfig, to_dict
from zhllama.errors import ZhllamaError
from zhllama.model.loading import check_model_vocab, load_tokenizer, tokenizer_sha256
from zhllama.runs import latest_checkpoint
from zhllama.train.loop import train_loop, val_index_batches
from zhllama.train.mixing import MixedTrainData
from zhllama.train.run import base_vocab_size, check_run_dir, finish_run, load_for_training
from zhllama.train.trainable import check_qlora_available, prepare_trainable


class SftTrainData:
    """Rows of packed (or, with packing off, single) conversations, addressed as the loop wants them."""

    def __init__(self, train, val, seq_len: int, packing: bool, pad_id: int):
        from zhllama.data.sft_batches import pack_examples

        self.train, self.val, self.pad_id = train, val, pad_id

        def rows(examples):
            if examples is None or len(examples) == 0:
                return []
            return pack_examples(examples.lengths(), seq_len) if packing else [[i] for i in range(len(examples))]

        self.train_rows, self.val_rows = rows(train), rows(val)

    def num_train(self) -> int:
        return len(self.train_rows)

    def sample_tokens(self) -> np.ndarray:
        """Real tokens of every training row: its conversations, not the padding that widens it in a batch."""
        return np.array([sum(len(self.train.input_ids[i]) for i in row) for row in self.train_rows], dtype=np.int64)

    def train_batch(self, samples: list[int]) -> dict[str, torch.Tensor]:
        from zhllama.data.sft_batches import collate

        return collate(self.train, [self.train_rows[s] for s in samples], self.pad_id)

    def val_batches(self, batch_size: int, limit: int, rank: int, world: int):
        from zhllama.data.sft_batches import collate

        return [collate(self.val, [self.val_rows[i] for i in ids], self.pad_id)
                for ids in val_index_batches(len(self.val_rows), batch_size, limit, rank, world)]

    def useful_share(self) -> float:
        """Share of the row slots that hold real tokens (the rest is padding), over the training rows."""
        return useful_share(self.sample_tokens())


def split_conversations(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: a seeded choice of round(n * val_fraction) conversations is held out."""
    if not 0 <= val_fraction < 1:
        raise ZhllamaError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    order = np.random.default_rng([seed, 7]).permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def prepare_sft_data(model_dir: Path, data: list[str | Path], cfg: SftConfig, progress: bool = True):
    """Read, template, tokenize, split and pack; returns (train data, report dict).

    Files given as FILE:WEIGHT are mixed by weight (each packed on its own); without weights they are one pool.
    `cfg.replay` (DIR:FRACTION) mixes that share of rows of packed pretraining blocks in, loss on every token."""
    from zhllama.chat import get_template
    from zhllama.data.mix import parse_source

    template = get_template(cfg.template) if cfg.template else None
    if template is None:
        raise ZhllamaError("SFT needs a chat template: pass --template (atom, llama2, chatml or llama3) or set it in "
                           "the recipe")
    if not cfg.seq_len or cfg.seq_len < 8:
        raise ZhllamaError(f"seq_len must be at least 8 for SFT, got {cfg.seq_len}")
    sources = [parse_source(spec) for spec in data]
    weighted = any(source.folder != Path(spec) for source, spec in zip(sources, data, strict=True))
    replay = parse_replay(cfg.replay) if cfg.replay else None
    tokenizer = load_tokenizer(model_dir)
    check_model_vocab(model_dir, tokenizer)
    pad_id = scoring.pad_id(tokenizer)
    pools = [[s.folder] for s in sources] if weighted else [[s.folder for s in sources]]
    parts = [_conversation_rows(files, tokenizer, template, pad_id, cfg, progress) for files in pools]
    if not weighted and replay is None:
        return parts[0]
    rows = [part for part, _ in parts]
    names = [str(s.folder) for s in sources] if weighted else ["conversations"]
    weights = [s.weight for s in sources] if weighted else [1.0]
    if replay is not None and replay[1] > 0:
        weights = [w / sum(weights) * (1 - replay[1]) for w in weights] + [replay[1]]
        rows.append(_replay_rows(replay[0], model_dir, cfg))
        names.append(f"replay {replay[0]}")
    mixed = MixedTrainData(rows, names, weights, cfg.seed, cfg.mix_exhausted, pad_id)
    summary = {key: sum(summary[key] for _, summary in parts) for key in parts[0][1]
               if isinstance(parts[0][1][key], int) and not isinstance(parts[0][1][key], bool)}
    summary.update(skipped=[row for _, part in parts for row in part["skipped"]][:100], packing=cfg.packing,
                   train_rows=mixed.num_train(), useful_token_share=useful_share(mixed.sample_tokens()),
                   sources=dict(zip(names, (round(float(x), 6) for x in mixed.schedule.share), strict=True)))
    return mixed, summary


def parse_replay(spec: str) -> tuple[Path, float]:
    """`DIR:FRACTION`, the fraction of SFT rows that are packed pretraining blocks, in [0, 1)."""
    folder, sep, fraction = str(spec).rpartition(":")
    try:
        value = float(fraction) if sep else float("nan")
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise ZhllamaError(f"--replay {spec}: give DIR:FRACTION with a fraction in [0, 1), e.g. packed-zh:0.2")
    return Path(folder), value


def _conversation_rows(files: list[Path], tokenizer, template, pad_id: int, cfg: SftConfig, progress: bool):
    from zhllama.data.conversations import read_conversations
    from zhllama.data.readers import ReadReport
    from zhllama.data.sft_batches import tokenize_examples

    report = ReadReport()
    conversations = read_conversations(files, report)
    examples = tokenize_examples(tokenizer, template, conversations, cfg.seq_len, cfg.train_on_prompt, progress)
    examples.warn(cfg.seq_len)
    if len(examples) == 0:
        raise ZhllamaError(f"none of the {len(conversations)} conversations could be used (see the warnings)")
    train_ids, val_ids = split_conversations(len(examples), cfg.val_fraction, cfg.seed)
    rows = SftTrainData(examples.subset(train_ids), examples.subset(val_ids) if val_ids else None,
                        cfg.seq_len, cfg.packing, pad_id)
    summary = {**examples.counts(), "rows_skipped": len(report.skipped), "skipped": report.skipped[:100],
               "train_examples": len(train_ids), "val_examples": len(val_ids), "train_rows": rows.num_train(),
               "packing": cfg.packing, "useful_token_share": rows.useful_share()}
    return rows, summary


def _replay_rows(folder: Path, model_dir: Path, cfg: SftConfig):
    """Packed pretraining blocks as SFT rows (the first seq_len tokens of each), loss on every token; they take no
    part in validation, which stays on the conversations."""
    from zhllama.data.pack import PackedData, check_tokenizer
    from zhllama.train.pretrain import PackedTrainData

    packed = PackedData(folder, "train")
    check_tokenizer(packed, model_dir)
    rows = PackedTrainData(folder, min(cfg.seq_len, packed.seq_len), cfg.reset_position_ids)
    rows.val = None
    return rows


def useful_share(counts: np.ndarray) -> float:
    """Share of the row slots that hold real tokens (the rest is padding)."""
    return float(counts.sum()) / max(1, int(counts.max(initial=0)) * len(counts))


def sft(model_dir: str | Path, data: list[str | Path], out: str | Path, cfg: SftConfig,
        resume: bool = False) -> Path:
    """Fine-tune `model_dir` on conversations; returns the run folder (chat model in run/final)."""
    import torch.distributed as dist

    from zhllama.chat import get_template
    from zhllama.data.mix import parse_source

    model_dir, out = Path(model_dir), Path(out)
    if cfg.trainable == "qlora":
        check_qlora_available()  # before minutes of tokenizing
    check_run_dir(out, resume)
    train_data, summary = prepare_sft_data(model_dir, data, cfg)
    print(f"SFT data: {summary['train_examples']:,} conversations in {summary['train_rows']:,} rows "
          f"({summary['useful_token_share']:.1%} of the slots are real tokens), {summary['val_examples']:,} "
          f"held out; {summary['rows_skipped']} unreadable rows skipped", file=sys.stderr)
    make_dir(out)
    write_json_atomic(out / "sft_data.json", summary)
    base = load_for_training(model_dir, cfg.seq_len, nf4=cfg.trainable == "qlora", rope=cfg.rope,
                             rope_factor=cfg.rope_factor)
    model = prepare_trainable(base, cfg, base_vocab_size(model_dir))
    args = {"model": str(model_dir), "data": [str(p) for p in data], "config": to_dict(cfg), "resume": resume}
    inputs = {"tokenizer": tokenizer_sha256(model_dir), "data": [file_sha256(parse_source(p).folder) for p in data]}
    write_provenance(out, "train sft", args, inputs)
    result = train_loop(model, train_data, cfg, out, resume=resume and latest_checkpoint(out) is not None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        finish_run(result.model, out, model_dir, "train sft", args, inputs,
                   chat_template=get_template(cfg.template).jinja, state_dict=result.state_dict)
    return out

