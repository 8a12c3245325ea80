"""What a training step minimises: next-token cross-entropy (pretraining, SFT) or a preference loss (`train dpo`).

An objective turns a batch into a summed loss plus summed statistics, and says how many units the batch holds
(target tokens, or preference pairs). The loop divides both by the units of the whole global batch, so the loss is
normalised once over everything a step saw, whatever the accumulation and the number of processes.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from zhllama.scoring import IGNORE, token_nll


class Objective(Protocol):
    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def __call__(self, model, batch: dict[str, torch.Tensor], evaluating: bool = False
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]: ...

    def summary(self, means: dict[str, float]) -> dict[str, float]: ...  # per-unit means -> what the log shows


class LanguageModelling:
    """Summed next-token cross-entropy over the labelled positions; one unit is one target token. `chunked`:
    scoring.token_nll's (None: chunked where the logits would be large; False: the plain projection)."""

    def __init__(self, chunked: bool | None = None):
        self.chunked = chunked

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def __call__(self, model, batch: dict[str, torch.Tensor], evaluating: bool = False):
        # Only the target positions are projected onto the vocabulary when they are under 90% of the row (SFT).
        nll = token_nll(model, batch, sparse=0.9, with_accuracy=evaluating, chunked=self.chunked)
        return nll.nats, ({"accuracy": float(nll.correct)} if evaluating else {})

    def summary(self, means: dict[str, float]) -> dict[str, float]:
        if "accuracy" not in means:
            return means
        return {"loss": means["loss"], "perplexity": math.exp(min(means["loss"], 50)), "accuracy": means["accuracy"]}
