"""Corpora mixed by weight: which source, and which of its blocks, every training sample is.

A mix is a fixed sequence of samples (the mix's epoch) that the training loop shuffles like any other data: the
first samples are source 0's, then source 1's, and so on, each source holding its weight's share of the sequence.
Within a source the k-th sample is block perm_c[k mod n] of a seeded permutation perm_c drawn afresh for each pass
c over the source, so a source asked for more samples than it has repeats in a new order, never a fixed prefix.
Everything follows from the seed: a resumed run sees the samples an uninterrupted one does.

When sources run out at different times, `repeat` (the default) sizes the epoch so that every block of every
source appears at least once (small sources repeat); `stop` sizes it so that no block repeats, and the run ends
when the first source is exhausted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zhllama.errors import ZhllamaError

EXHAUSTED = ("repeat", "stop")


@dataclass(frozen=True)
class Source:
    folder: Path
    weight: float


def parse_source(spec: str | Path) -> Source:
    """`DIR` or `DIR:WEIGHT` (weight 1 when absent)."""
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if not sep or "/" in tail:
        return Source(Path(text), 1.0)
    try:
        weight = float(tail)
    except ValueError:
        raise ZhllamaError(f"--data {text}: weight {tail!r} is not a positive number") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ZhllamaError(f"--data {text}: weight {tail!r} is not a positive number")
    return Source(Path(head), weight)


class MixSchedule:
    """The mix's epoch: sample index -> (source, block), for sources of `lengths` blocks mixed by `weights`."""

    def __init__(self, lengths: list[int], weights: list[float], seed: int, exhausted: str = "repeat"):
        if exhausted not in EXHAUSTED:
            raise ZhllamaError(f"mix_exhausted {exhausted!r}: choose {' or '.join(EXHAUSTED)}")
        if any(n == 0 for n in lengths):
            raise ZhllamaError("a --data source has no complete block")
        self.lengths, self.seed = [int(n) for n in lengths], seed
        share = np.asarray(weights, dtype=np.float64) / sum(weights)
        per_share = np.asarray(self.lengths) / share
        # repeat: long enough for every block of every source; stop: short enough that none repeats.
        total = math.ceil(per_share.max() - 1e-9) if exhausted == "repeat" else math.floor(per_share.min() + 1e-9)
        self.counts = _largest_remainder(share, total)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.share = share
        self.blocks = np.concatenate([self._blocks(s, int(c)) for s, c in enumerate(self.counts)])

    def _blocks(self, source: int, count: int) -> np.ndarray:
        n = self.lengths[source]
        orders = [np.random.default_rng([self.seed, source, p, 0x6D6978]).permutation(n) for p in range(-(-count // n))]
        return np.concatenate(orders or [np.zeros(0, dtype=np.int64)])[:count]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def source_of(self, samples: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, samples, side="right") - 1

    def locate(self, sample: int) -> tuple[int, int]:
        return int(self.source_of(np.asarray([sample]))[0]), int(self.blocks[sample])


def _largest_remainder(share: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, each within one of share * total."""
    exact = share * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts
