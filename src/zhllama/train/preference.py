"""Preference losses (DPO, ORPO, SimPO) as an objective of the one training loop, and pairs as its batches.

A batch holds B pairs as 2B rows, the B chosen conversations first and then the B rejected ones, padded as SFT
pads (positions restart after each conversation, so the padding is an attention block of its own): chosen and
rejected go through the model in one forward pass. Only the final reply's tokens are labelled, and a side's
log-probability is the sum over them (`scoring.token_nll` per row, only those positions projected onto the
vocabulary).

DPO compares the policy with a reference model. The reference log-probabilities are computed once, before
training, with the starting model (with LoRA: the base, adapters disabled), and kept with the run: memory holds one
model, and a resumed run reuses them. ORPO and SimPO need no reference.

Formulas, per pair, with c/r the summed log-probabilities of the chosen/rejected reply, |c|/|r| their token
counts, rc/rr the reference's, beta, gamma and label smoothing eps:
* DPO (Rafailov et al. 2023, sigmoid; conservative with eps): z = beta * ((c - rc) - (r - rr)),
  loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z); rewards beta (c - rc) and beta (r - rr).
* ORPO (Hong et al. 2024): with the mean log-probabilities a = c/|c|, b = r/|r|,
  log odds = (a - b) - (log(1 - e^a) - log(1 - e^b)); loss = -a - beta log sigmoid(log odds): the chosen reply's
  mean NLL (the SFT term) plus beta times the odds-ratio term; rewards beta a and beta b.
* SimPO (Meng et al. 2024): z = beta a - beta b - gamma, loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z);
  rewards beta a and beta b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zhllama.errors import ZhllamaError
from zhllama.scoring import IGNORE, shift_labels, token_nll

LOSSES = ("dpo", "orpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}
REFERENCE_KEYS = ("ref_chosen", "ref_rejected")  # per-pair reference log-probabilities, carried in the batch
STATS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")


def check_loss_settings(loss: str, beta: float | None, gamma: float, label_smoothing: float) -> float:
    """Refuse settings no loss has, before any data is read; returns beta (the loss's default when None)."""
    if loss not in LOSSES:
        raise ZhllamaError(f"unknown --loss {loss!r}; choose {', '.join(LOSSES)}")
    beta = DEFAULT_BETA[loss] if beta is None else beta
    if not beta > 0:
        raise ZhllamaError(f"--beta must be a positive number, got {beta}")
    if not gamma >= 0:
        raise ZhllamaError(f"--gamma must be zero or positive, got {gamma}")
    if not 0 <= label_smoothing < 0.5:
        raise ZhllamaError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    return beta


def preference_losses(loss: str, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                      rejected_tokens: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                      ref_rejected: torch.Tensor | None = None, *, beta: float, gamma: float = 0.0,
                      label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards, from summed reply log-probabilities (fp32)."""
    if loss == "dpo":
        if ref_chosen is None or ref_rejected is None:
            raise ZhllamaError("DPO needs the reference model's log-probabilities")
        chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        return _smoothed(chosen_reward - rejected_reward, label_smoothing), chosen_reward, rejected_reward
    mean_chosen, mean_rejected = chosen / chosen_tokens, rejected / rejected_tokens
    chosen_reward, rejected_reward = beta * mean_chosen, beta * mean_rejected
    if loss == "simpo":
        return _smoothed(chosen_reward - rejected_reward - gamma, label_smoothing), chosen_reward, rejected_reward
    if loss == "orpo":
        log_odds = (mean_chosen - mean_rejected) - (_log1m_exp(mean_chosen) - _log1m_exp(mean_rejected))
        return -mean_chosen - beta * F.logsigmoid(log_odds), chosen_reward, rejected_reward
    raise ZhllamaError(f"unknown --loss {loss!r}; choose {', '.join(LOSSES)}")


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 (where log1p(-exp(x)) loses its digits); a mean log-probability of
    exactly 0 is held just below it so the odds stay finite."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def reply_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of the chosen and of the rejected rows, and their counts."""
    inputs = {k: v for k, v in batch.items() if k not in REFERENCE_KEYS}
    logps = -token_nll(model, inputs, per="row").nats
    counts = (shift_labels(batch["labels"]) != IGNORE).sum(1).to(logps.dtype)
    half = len(logps) // 2
    return logps[:half], logps[half:], counts[:half], counts[half:]


class PreferenceObjective:
    """The loop's objective for `train dpo`: one unit is one pair."""

    def __init__(self, loss: str, beta: float | None = None, gamma: float = 0.0, label_smoothing: float = 0.0):
        self.loss, self.gamma, self.label_smoothing = loss, gamma, label_smoothing
        self.beta = check_loss_settings(loss, beta, gamma, label_smoothing)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def __call__(self, model, batch: dict[str, torch.Tensor], evaluating: bool = False):
        chosen, rejected, chosen_tokens, rejected_tokens = reply_logps(model, batch)
        losses, chosen_reward, rejected_reward = preference_losses(
            self.loss, chosen, rejected, chosen_tokens, rejected_tokens, batch.get("ref_chosen"),
            batch.get("ref_rejected"), beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            stats = {"reward_accuracy": (chosen_reward > rejected_reward).float().sum(),
                     "reward_margin": (chosen_reward - rejected_reward).sum(), "chosen_reward": chosen_reward.sum(),
                     "rejected_reward": rejected_reward.sum(), "chosen_logp": chosen.sum(),
                     "rejected_logp": rejected.sum()}
        return losses.sum(), {k: float(v) for k, v in stats.items()}

    def summary(self, means: dict[str, float]) -> dict[str, float]:
        return means
