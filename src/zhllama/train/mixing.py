"""Training data from several sources mixed by weight (data/mix.py decides which source and row each sample is):
packed corpora for `train pretrain --data A:0.8 --data B:0.2`, conversation files and replayed pretraining blocks
for `train sft`. Each source builds its own rows; a batch puts them side by side, padded to one width."""

from __future__ import annotations

import numpy as np
import torch

from zhllama.scoring import IGNORE


class MixedTrainData:
    """The loop's TrainData over sources that are TrainData themselves; `names` label them in the log."""

    def __init__(self, sources: list, names: list[str], weights: list[float], seed: int, exhausted: str,
                 pad_id: int = 0):
        from zhllama.data.mix import MixSchedule

        self.sources, self.names, self.pad_id = sources, names, pad_id
        self.schedule = MixSchedule([s.num_train() for s in sources], weights, seed, exhausted)

    def num_train(self) -> int:
        return len(self.schedule)

    def sample_tokens(self) -> np.ndarray:
        groups = self.source_of(np.arange(self.num_train()))
        return np.concatenate([s.sample_tokens()[self.schedule.blocks[groups == i]]
                               for i, s in enumerate(self.sources)])

    def source_of(self, samples: np.ndarray) -> np.ndarray:
        return self.schedule.source_of(samples)

    def train_batch(self, samples: list[int]) -> dict[str, torch.Tensor]:
        rows = []
        for sample in samples:
            source, row = self.schedule.locate(sample)
            rows.append(self.sources[source].train_batch([row]))
        return concat_rows(rows, self.pad_id)

    def val_batches(self, batch_size: int, limit: int, rank: int, world: int):
        """Each source's validation batches in turn, `limit` in all, shared between the sources that have some."""
        batches = [s.val_batches(batch_size, limit, rank, world) for s in self.sources]
        with_val = sum(1 for b in batches if b)
        return [b for source in batches for b in source[: max(1, limit // max(1, with_val))]]


def concat_rows(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of several batches as one batch. Narrower rows are padded as collate pads SFT rows: pad tokens whose
    labels are ignored and whose positions restart at 0, so the padding is an attention block of its own."""
    width = max(b["input_ids"].shape[1] for b in batches)
    if all(b["input_ids"].shape[1] == width for b in batches) and len({frozenset(b) for b in batches}) == 1:
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for b in batches:
        rows, n = b["input_ids"].shape
        positions = b.get("position_ids", torch.arange(n).expand(rows, n))
        pad = width - n
        out["input_ids"].append(torch.cat([b["input_ids"], torch.full((rows, pad), pad_id)], 1))
        out["labels"].append(torch.cat([b["labels"], torch.full((rows, pad), IGNORE)], 1))
        out["position_ids"].append(torch.cat([positions, torch.arange(pad).expand(rows, pad)], 1))
    return {k: torch.cat(v) for k, v in out.items()}
