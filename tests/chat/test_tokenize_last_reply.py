"""tokenize_conversation(only_last_reply=True): the same ids, and only the last reply (with its marker) a target."""

from __future__ import annotations

import pytest

from tests.chat.test_templates import CONV
from zhllama.chat import IGNORE_INDEX, tokenize_conversation
from zhllama.errors import ZhllamaError
from zhllama.model.loading import load_tokenizer

LAST_TARGET = {"atom": "It is 4.\n</s>", "llama2": "It is 4. </s>", "chatml": "It is 4.<|im_end|>"}


@pytest.fixture(scope="module")
def tok(llama2_dir):
    return load_tokenizer(llama2_dir)


def last_run_only(labels):
    """The labels with every target run but the last one ignored."""
    out = list(labels)
    i = len(out) - 1
    while i >= 0 and out[i] == IGNORE_INDEX:
        i -= 1
    while i >= 0 and out[i] != IGNORE_INDEX:
        i -= 1
    out[: i + 1] = [IGNORE_INDEX] * (i + 1)
    return out


@pytest.mark.parametrize("name", ["atom", "llama2", "chatml"])
def test_only_the_last_reply_is_a_target(name, tok):
    full = tokenize_conversation(tok, name, CONV)
    last = tokenize_conversation(tok, name, CONV, only_last_reply=True)
    assert last["input_ids"] == full["input_ids"]
    assert last["labels"] == last_run_only(full["labels"])
    assert last["labels"] != full["labels"]  # the first reply was a target and is not any more
    targets = [lab for lab in last["labels"] if lab != IGNORE_INDEX]
    assert tok.decode(targets, skip_special_tokens=False).lstrip(" ") == LAST_TARGET[name]


def test_a_trailing_user_message_leaves_the_reply_before_it_the_target(tok):
    enc = tokenize_conversation(tok, "atom", CONV[:4], only_last_reply=True)
    targets = [lab for lab in enc["labels"] if lab != IGNORE_INDEX]
    assert tok.decode(targets, skip_special_tokens=False).lstrip(" ") == "你好！有什么可以帮你？\n</s>"


def test_truncation_is_unchanged_and_single_reply_labels_equal_sft(tok):
    full = tokenize_conversation(tok, "chatml", CONV, only_last_reply=True)
    cut = tokenize_conversation(tok, "chatml", CONV, max_len=len(full["input_ids"]) - 1, only_last_reply=True)
    sft = tokenize_conversation(tok, "chatml", [CONV[0], *CONV[3:]])
    assert cut["dropped_turns"] == 1
    assert (cut["input_ids"], cut["labels"]) == (sft["input_ids"], sft["labels"])


def test_only_last_reply_refuses_train_on_prompt(tok):
    with pytest.raises(ZhllamaError, match="only_last_reply and train_on_prompt"):
        tokenize_conversation(tok, "atom", CONV, train_on_prompt=True, only_last_reply=True)
