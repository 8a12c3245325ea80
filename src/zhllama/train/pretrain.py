"""Continued pretraining on packed data: the blocks as the loop wants them, validation, and the run itself."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from zhllama.artifacts import make_dir, write_provenance
from zhllama.config import TrainConfig, to_dict
from zhllama.errors import ZhllamaError
from zhllama.model.loading import tokenizer_sha256
from zhllama.runs import latest_checkpoint
from zhllama.train.loop import IGNORE, token_loss, train_loop, val_index_batches
from zhllama.train.mixing import MixedTrainData
from zhllama.train.run import base_vocab_size, check_run_dir, finish_run, load_for_training
from zhllama.train.trainable import check_qlora_available, prepare_trainable


class PackedTrainData:
    """Packed blocks as the loop wants them: every token is a target, or with positions reset per document,
    every token but a document's first (nothing before it in the block belongs to the same document).

    Positions restarting at 0 make the model attend one document at a time (train/varlen.py, the same span
    attention SFT uses), so a block of several documents computes what each document alone would. `reset_positions`
    None follows the data: on when it was packed with --doc-boundaries.
    """

    def __init__(self, folder: Path, seq_len: int, reset_positions: bool | None = None):
        from zhllama.data.pack import PackedData

        self.train = PackedData(folder, "train")
        self.val = PackedData(folder, "val") if "val" in self.train.meta["splits"] else None
        if reset_positions is None:
            reset_positions = bool(self.train.meta["doc_boundaries"])
        self.seq_len, self.reset_positions = seq_len, reset_positions

    def _batch(self, packed, ids: list[int]) -> dict[str, torch.Tensor]:
        # A shorter --seq-len than the packed one trains on the start of each block.
        tokens = torch.from_numpy(np.stack([packed.block(i)[: self.seq_len] for i in ids]))
        batch = {"input_ids": tokens, "labels": tokens.clone()}
        if self.reset_positions:
            pos = torch.from_numpy(np.stack([packed.position_ids(i)[: self.seq_len] for i in ids]))
            batch["position_ids"] = pos
            batch["labels"][pos == 0] = IGNORE
        return batch

    def num_train(self) -> int:
        return len(self.train)

    def sample_tokens(self) -> np.ndarray:
        return np.full(len(self.train), self.seq_len, dtype=np.int64)  # blocks have no padding

    def train_batch(self, samples: list[int]) -> dict[str, torch.Tensor]:
        return self._batch(self.train, samples)

    def val_batches(self, batch_size: int, limit: int, rank: int, world: int):
        if self.val is None or len(self.val) == 0:
            return []
        return [self._batch(self.val, ids) for ids in val_index_batches(len(self.val), batch_size, limit, rank, world)]


@torch.no_grad()
def validate(model_dir: str | Path, data_dir: str | Path, batch_size: int = 8, batches: int = 16) -> dict:
    """Validation loss, perplexity and next-token accuracy of a model on packed data's val split."""
    from zhllama.data.pack import PackedData, check_tokenizer

    packed = PackedData(data_dir, "train")
    check_tokenizer(packed, model_dir)
    model = load_for_training(Path(model_dir)).eval()
    data = PackedTrainData(Path(data_dir), packed.seq_len)  # per-document when the data has boundaries
    total = count = correct = 0
    for batch in data.val_batches(batch_size, batches, 0, 1):
        loss, n, c = token_loss(model, batch, with_accuracy=True)
        total, count, correct = total + float(loss), count + n, correct + c
    if count == 0:
        raise ZhllamaError(f"{data_dir} has no validation blocks; pack it with --val-fraction")
    return {"loss": total / count, "perplexity": math.exp(total / count), "accuracy": correct / count}


def pretrain(model_dir: str | Path, data: str | Path | list[str | Path], out: str | Path, cfg: TrainConfig,
             resume: bool = False) -> Path:
    """Continue pretraining `model_dir` on packed data (one folder, or several as `DIR:WEIGHT` mixed by weight);
    returns the run folder (final model in run/final)."""
    from zhllama.data.mix import parse_source
    from zhllama.data.pack import PackedData, check_tokenizer

    model_dir, out = Path(model_dir), Path(out)
    sources = [parse_source(spec) for spec in ([data] if isinstance(data, (str, Path)) else data)]
    qlora = cfg.trainable == "qlora"
    if qlora:
        check_qlora_available()  # the same checks as `train sft --qlora`, before anything loads
    packs = [PackedData(source.folder, "train") for source in sources]
    _check_alike(packs, cfg.reset_position_ids)
    for packed in packs:
        check_tokenizer(packed, model_dir)
    packed = packs[0]
    seq_len = cfg.seq_len or packed.seq_len
    if seq_len > packed.seq_len:
        raise ZhllamaError(f"--seq-len {seq_len} is longer than the packed blocks ({packed.seq_len}); re-pack")
    cfg.seq_len = seq_len
    train_data = _train_data(sources, seq_len, cfg)
    check_run_dir(out, resume)
    make_dir(out)
    base = load_for_training(model_dir, seq_len, nf4=qlora, rope=cfg.rope, rope_factor=cfg.rope_factor)
    model = prepare_trainable(base, cfg, base_vocab_size(model_dir))
    specs = [str(source.folder) if len(sources) == 1 else f"{source.folder}:{source.weight:g}" for source in sources]
    args = {"model": str(model_dir), "data": specs[0] if len(specs) == 1 else specs, "config": to_dict(cfg),
            "resume": resume}
    inputs = {"tokenizer": tokenizer_sha256(model_dir), "data_tokenizer": packed.tokenizer_sha256}
    write_provenance(out, "train pretrain", args, inputs)
    result = train_loop(model, train_data, cfg, out, resume=resume and latest_checkpoint(out) is not None)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        finish_run(result.model, out, model_dir, "train pretrain", args, inputs, state_dict=result.state_dict)
    return out


def _check_alike(packs, reset_position_ids: bool | None) -> None:
    """Mixed sources must be packed with one tokenizer, at one block length, and alike in document boundaries
    (unless reset_position_ids decides for all of them)."""
    first = packs[0]
    for other in packs[1:]:
        if other.tokenizer_sha256 != first.tokenizer_sha256:
            raise ZhllamaError(f"{first.folder} was packed with tokenizer {first.tokenizer_sha256[:12]} and "
                               f"{other.folder} with {other.tokenizer_sha256[:12]}; mix data packed with one tokenizer")
        if other.seq_len != first.seq_len:
            raise ZhllamaError(f"{first.folder} was packed in blocks of {first.seq_len} tokens and {other.folder} in "
                               f"blocks of {other.seq_len}; mix data packed at one --seq-len")
        if reset_position_ids is None and other.meta["doc_boundaries"] != first.meta["doc_boundaries"]:
            raise ZhllamaError(f"{first.folder} and {other.folder} differ in --doc-boundaries; re-pack one, or set "
                               "reset_position_ids in the recipe")


def _train_data(sources, seq_len: int, cfg: TrainConfig):
    """One folder as it is; several mixed by weight. With mix_exhausted: stop, the run ends when the first source
    runs out: max_steps is cut to the steps the sources fill without repeating a block, and the log says so."""
    import os
    import sys

    if len(sources) == 1:
        return PackedTrainData(sources[0].folder, seq_len, cfg.reset_position_ids)
    data = MixedTrainData([PackedTrainData(s.folder, seq_len, cfg.reset_position_ids) for s in sources],
                          [str(s.folder) for s in sources], [s.weight for s in sources], cfg.seed, cfg.mix_exhausted)
    per_step = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.mix_exhausted == "stop" and cfg.max_steps * per_step > data.num_train():
        steps = data.num_train() // per_step
        if steps == 0:
            raise ZhllamaError(f"mix_exhausted: stop, and the sources run out before one step ({per_step} blocks)")
        print(f"mix_exhausted: stop: the first source runs out after {data.num_train()} blocks, so training stops "
              f"at step {steps} instead of {cfg.max_steps}", file=sys.stderr)
        cfg.max_steps = steps
    return data
