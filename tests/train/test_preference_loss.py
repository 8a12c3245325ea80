"""The preference losses equal their papers' formulas, computed here by hand with `math` on fixed numbers."""

import math

import pytest
import torch

from zhllama.errors import ZhllamaError
from zhllama.train.preference import check_loss_settings, preference_losses


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# Two pairs: summed reply log-probabilities, reply lengths, and the reference's log-probabilities.
CHOSEN, REJECTED = t(-5.0, -12.0), t(-7.0, -9.0)
CHOSEN_TOKENS, REJECTED_TOKENS = t(2.0, 4.0), t(3.0, 3.0)
REF_CHOSEN, REF_REJECTED = t(-6.0, -11.0), t(-6.0, -10.0)


def test_dpo_is_the_sigmoid_loss_of_the_reward_difference_with_label_smoothing():
    for eps in (0.0, 0.1):
        losses, chosen_reward, rejected_reward = preference_losses(
            "dpo", CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, REF_CHOSEN, REF_REJECTED, beta=0.1,
            label_smoothing=eps)
        # pair 0: z = 0.1 * ((-5 + 6) - (-7 + 6)) = 0.2; pair 1: z = 0.1 * ((-12 + 11) - (-9 + 10)) = -0.2
        expected = [-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z) for z in (0.2, -0.2)]
        assert losses.tolist() == pytest.approx(expected, abs=1e-6)
        assert chosen_reward.tolist() == pytest.approx([0.1, -0.1], abs=1e-6)
        assert rejected_reward.tolist() == pytest.approx([-0.1, 0.1], abs=1e-6)
    assert expected[0] == pytest.approx(0.6181389, abs=1e-6)


def test_orpo_is_the_mean_nll_of_the_chosen_reply_plus_beta_times_the_odds_ratio_term():
    losses, chosen_reward, rejected_reward = preference_losses(
        "orpo", CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, beta=0.25)
    expected = []
    for c, r, nc, nr in ((-5, -7, 2, 3), (-12, -9, 4, 3)):
        a, b = c / nc, r / nr
        log_odds = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        expected.append(-a - 0.25 * log_sigmoid(log_odds))
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_reward.tolist() == pytest.approx([0.25 * -2.5, 0.25 * -3.0], abs=1e-6)
    assert rejected_reward.tolist() == pytest.approx([0.25 * -7 / 3, 0.25 * -3.0], abs=1e-6)


def test_orpo_stays_finite_when_the_model_is_certain_of_the_chosen_reply():
    losses, _, _ = preference_losses("orpo", t(0.0), t(-3.0), t(2.0), t(3.0), beta=0.1)
    assert torch.isfinite(losses).all()


def test_simpo_is_the_length_normalised_margin_loss():
    losses, chosen_reward, rejected_reward = preference_losses(
        "simpo", CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, beta=2.0, gamma=0.5)
    # pair 0: z = 2 * (-5 / 2) - 2 * (-7 / 3) - 0.5; pair 1: z = 2 * (-12 / 4) - 2 * (-9 / 3) - 0.5 = -0.5
    expected = [-log_sigmoid(2 * -2.5 - 2 * (-7 / 3) - 0.5), -log_sigmoid(-0.5)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert (chosen_reward - rejected_reward).tolist() == pytest.approx([-5 + 14 / 3, 0.0], abs=1e-6)


def test_settings_no_loss_has_are_refused():
    with pytest.raises(ZhllamaError, match="unknown --loss 'kto'; choose dpo, orpo, simpo"):
        check_loss_settings("kto", None, 0.5, 0.0)
    with pytest.raises(ZhllamaError, match="--beta must be a positive number"):
        check_loss_settings("dpo", 0.0, 0.5, 0.0)
    with pytest.raises(ZhllamaError, match="--gamma"):
        check_loss_settings("simpo", None, -1.0, 0.0)
    with pytest.raises(ZhllamaError, match="label_smoothing"):
        check_loss_settings("dpo", None, 0.5, 0.5)
    assert check_loss_settings("simpo", None, 0.5, 0.0) == 2.0
    assert check_loss_settings("dpo", None, 0.5, 0.0) == 0.1
