"""Multiple-choice scoring: exact log-probabilities of the reply tokens, and the built-in sentiment task."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from zhllama.chat import IGNORE_INDEX, tokenize_conversation
from zhllama.data import builtin
from zhllama.eval.choice import choice_accuracy, score_choices
from zhllama.model.loading import load_tokenizer


def test_scores_are_the_reply_log_probabilities(tiny_zh_model):
    tok = load_tokenizer(tiny_zh_model)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model)).eval()
    prompts = [[{"role": "user", "content": "今天天气怎么样？"}], [{"role": "user", "content": "你好"}]]
    choices = ["很好", "不好，下雨了", "正面"]
    scores = score_choices(model, tok, "atom", prompts, choices, batch_size=4, progress=False)
    assert scores.shape == (2, 3)
    for i, prompt in enumerate(prompts):
        for j, choice in enumerate(choices):
            enc = tokenize_conversation(tok, "atom", [*prompt, {"role": "assistant", "content": choice}])
            ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"])
            with torch.no_grad():
                logp = F.log_softmax(model(ids).logits[0, :-1], -1)
            targets = labels[1:]
            keep = targets != IGNORE_INDEX
            want = logp[keep].gather(1, targets[keep][:, None]).sum().item()
            assert scores[i, j] == pytest.approx(want, abs=1e-4)
    result = choice_accuracy(model, tok, "atom", prompts, choices, [0, 2], progress=False)
    assert result["n"] == 2 and sum(result["predicted"].values()) == 2
    assert result["accuracy"] == np.mean(scores.argmax(1) == np.array([0, 2]))


def test_sentiment_examples_are_balanced_seeded_and_split():
    train = builtin.sentiment_examples("train", 100)
    assert len(train) == 100 and sum(r["label"] == "pos" for r in train) == 50
    assert train == builtin.sentiment_examples("train", 100)
    assert {r["output"] for r in train} == {"正面", "负面"}
    assert all(len(r["input"]) <= 120 for r in train)
    heldout = {r["input"] for r in builtin.sentiment_examples("heldout")}
    assert len(heldout) > 800 and not heldout & {r["input"] for r in train}
    prompt = builtin.sentiment_prompt(train[0])
    assert prompt == [{"role": "user", "content": f"{builtin.SENTIMENT_INSTRUCTION}\n{train[0]['input']}"}]
