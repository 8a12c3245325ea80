"""Chat templates: exact formats, Jinja == Python rendering, apply_chat_template parity, loss masks, truncation."""

from __future__ import annotations

import random

import pytest
from jinja2 import TemplateError
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from zhllama.chat import (
    IGNORE_INDEX,
    TEMPLATES,
    get_template,
    register_chat_template,
    tokenize_conversation,
    validate_messages,
)
from zhllama.errors import ZhllamaError

NAMES = sorted(TEMPLATES)
# The templates of the Llama-2 vocabulary these tests tokenize with; llama3 has its own tests (test_llama3.py).
LLAMA2_NAMES = ["atom", "chatml", "llama2"]

CONV = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]

EXPECTED = {
    "atom": (
        "<s>System: 你是一个乐于助人的助手。\n</s>"
        "<s>Human: 你好\n</s><s>Assistant: 你好！有什么可以帮你？\n</s>"
        "<s>Human: What is 2+2?\n</s><s>Assistant: It is 4.\n</s>"
    ),
    "llama2": (
        "<s>[INST] <<SYS>>\n你是一个乐于助人的助手。\n<</SYS>>\n\n你好 [/INST] 你好！有什么可以帮你？ </s>"
        "<s>[INST] What is 2+2? [/INST] It is 4. </s>"
    ),
    "chatml": (
        "<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n你是一个乐于助人的助手。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n你好！有什么可以帮你？<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 4.<|eot_id|>"
    ),
}

EXPECTED_TARGETS = {
    "atom": ["你好！有什么可以帮你？\n</s>", "It is 4.\n</s>"],
    "llama2": ["你好！有什么可以帮你？ </s>", "It is 4. </s>"],
    "chatml": ["你好！有什么可以帮你？<|im_end|>", "It is 4.<|im_end|>"],
    "llama3": ["你好！有什么可以帮你？<|eot_id|>", "It is 4.<|eot_id|>"],
}

GEN_SUFFIX = {"atom": "<s>Assistant: ", "llama2": "", "chatml": "<|im_start|>assistant\n",
              "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}

PIECES = ["你好", "今天天气怎么样？", "hello", "world", " ", "\n", "  spaced  ", "数学", "1+1=2", "Python 代码", "！"]
PIECES += ["é", "\t"]


def random_conversation(rng: random.Random) -> tuple[list[dict], bool]:
    def text() -> str:
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 5)))

    msgs = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
    n = rng.randint(1, 6)
    for i in range(n):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text()})
    add_gen = msgs[-1]["role"] == "user" and rng.random() < 0.7
    return msgs, add_gen


def jinja(template, messages, add_generation_prompt):
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template.jinja, add_generation_prompt=add_generation_prompt
    )
    return rendered[0]


@pytest.fixture(scope="module")
def tok(extended_dir):
    return AutoTokenizer.from_pretrained(str(extended_dir))


@pytest.mark.parametrize("name", NAMES)
def test_exact_rendering(name):
    t = get_template(name)
    assert t.render(CONV) == EXPECTED[name]
    targets = [text for text, is_target in t.render_segments(CONV) if is_target]
    assert targets == [f" {x}" if name == "llama2" else x for x in EXPECTED_TARGETS[name]]


def test_generation_prompts():
    prompt = CONV[:2]
    assert get_template("atom").render(prompt, True) == (
        "<s>System: 你是一个乐于助人的助手。\n</s><s>Human: 你好\n</s><s>Assistant: "
    )
    assert get_template("llama2").render(prompt, True) == get_template("llama2").render(prompt, False)
    assert get_template("llama2").render(prompt) == (
        "<s>[INST] <<SYS>>\n你是一个乐于助人的助手。\n<</SYS>>\n\n你好 [/INST]"
    )
    assert get_template("chatml").render(prompt, True) == (
        "<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama2_matches_meta_reference():
    """Meta's chat_completion: system folded into the first user turn, prompts and answers stripped."""
    msgs = [
        {"role": "system", "content": " sys "},
        {"role": "user", "content": "  q1 \n"},
        {"role": "assistant", "content": "\n a1  "},
        {"role": "user", "content": " q2"},
    ]
    b_sys, e_sys = "<<SYS>>\n", "\n<</SYS>>\n\n"
    first = b_sys + " sys " + e_sys + "  q1 \n"
    expected = f"<s>[INST] {first.strip()} [/INST] {'a1'} </s>" + "<s>[INST] q2 [/INST]"
    assert get_template("llama2").render(msgs) == expected
    # without a system message nothing is folded in
    assert get_template("llama2").render(msgs[1:2]) == "<s>[INST] q1 [/INST]"


@pytest.mark.parametrize("name", NAMES)
def test_jinja_equals_render(name):
    t = get_template(name)
    rng = random.Random(1234)
    for _ in range(60):
        msgs, add_gen = random_conversation(rng)
        assert jinja(t, msgs, add_gen) == t.render(msgs, add_generation_prompt=add_gen), msgs
    assert jinja(t, CONV, False) == EXPECTED[name]


@pytest.mark.parametrize("name", NAMES)
def test_jinja_refuses_bad_conversations(name):
    t = get_template(name)
    bad = [
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
    ]
    for msgs in bad:
        with pytest.raises(TemplateError):
            jinja(t, msgs, False)
        with pytest.raises(ZhllamaError):
            t.render(msgs)
    ended = CONV[:3]
    with pytest.raises(TemplateError):
        jinja(t, ended, True)
    with pytest.raises(ZhllamaError):
        t.render(ended, add_generation_prompt=True)


@pytest.mark.parametrize("name", LLAMA2_NAMES)
def test_apply_chat_template_parity(name, tok, tmp_path):
    t = get_template(name)
    register_chat_template(tok, t)
    tok.save_pretrained(str(tmp_path))
    tok.chat_template = None
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.chat_template == t.jinja
    rng = random.Random(99)
    convs = [(CONV, False), (CONV[:2], True), (CONV[1:], False)] + [random_conversation(rng) for _ in range(25)]
    for msgs, add_gen in convs:
        text = loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_gen)
        assert text == t.render(msgs, add_generation_prompt=add_gen)
        out = loaded.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_gen)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        ids = list(ids)
        assert ids == loaded(text, add_special_tokens=False)["input_ids"]
        if not add_gen:
            assert ids == tokenize_conversation(loaded, t, msgs)["input_ids"]


@pytest.mark.parametrize("name", LLAMA2_NAMES)
def test_segment_ids_concatenate_to_whole(name, tok):
    """Offsets-based labelling keeps the ids of the whole text; check BOS/EOS really are special ids there."""
    t = get_template(name)
    enc = tokenize_conversation(tok, t, CONV)
    assert enc["input_ids"] == tok(t.render(CONV), add_special_tokens=False)["input_ids"]
    if name in ("atom", "llama2"):
        n_turn_markers = {"atom": 5, "llama2": 2}[name]
        assert enc["input_ids"].count(tok.bos_token_id) == n_turn_markers
        assert enc["input_ids"].count(tok.eos_token_id) == n_turn_markers
    assert len(enc["labels"]) == len(enc["input_ids"])
    assert enc["dropped_turns"] == 0


def target_runs(labels):
    runs, cur = [], []
    for x in labels:
        if x == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(x)
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("name", LLAMA2_NAMES)
def test_labels_cover_exactly_assistant_replies(name, tok):
    t = get_template(name)
    enc = tokenize_conversation(tok, t, CONV)
    runs = target_runs(enc["labels"])
    decoded = [tok.decode(r, skip_special_tokens=False) for r in runs]
    assert [d.lstrip(" ") for d in decoded] == EXPECTED_TARGETS[name]
    # every label is either -100 or the input id at that position
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(enc["labels"], enc["input_ids"], strict=True))
    # the end-of-turn marker of every reply is labelled
    if name in ("atom", "llama2"):
        eos_labelled = [lab for lab in enc["labels"] if lab == tok.eos_token_id]
        assert len(eos_labelled) == 2


@pytest.mark.parametrize("name", LLAMA2_NAMES)
def test_labels_without_system_and_single_turn(name, tok):
    t = get_template(name)
    msgs = CONV[1:3]
    runs = target_runs(tokenize_conversation(tok, t, msgs)["labels"])
    assert [tok.decode(r, skip_special_tokens=False).lstrip(" ") for r in runs] == EXPECTED_TARGETS[name][:1]
    # a conversation that ends with a user message has no target after the last reply
    runs = target_runs(tokenize_conversation(tok, t, CONV[:4])["labels"])
    assert len(runs) == 1


@pytest.mark.parametrize("name", LLAMA2_NAMES)
def test_train_on_prompt_labels_everything(name, tok):
    enc = tokenize_conversation(tok, name, CONV, train_on_prompt=True)
    assert enc["labels"] == enc["input_ids"]


@pytest.mark.parametrize("name", LLAMA2_NAMES)
def test_truncation_drops_oldest_turns(name, tok):
    t = get_template(name)
    msgs = [CONV[0]]
    for i in range(5):
        msgs += [{"role": "user", "content": f"问题{i} " * 10}, {"role": "assistant", "content": f"回答{i} " * 10}]
    full = tokenize_conversation(tok, t, msgs)
    last_two = tokenize_conversation(tok, t, [msgs[0], *msgs[-4:]])
    out = tokenize_conversation(tok, t, msgs, max_len=len(last_two["input_ids"]))
    assert len(full["input_ids"]) > len(out["input_ids"])
    assert out["dropped_turns"] == 3
    assert out["input_ids"] == last_two["input_ids"]
    assert out["labels"] == last_two["labels"]
    # the system message is kept
    assert tok.decode(out["input_ids"]).count("你是一个乐于助人的助手") == 1
    last_only = tokenize_conversation(tok, t, [msgs[0], *msgs[-2:]])
    with pytest.raises(ZhllamaError, match="max_len"):
        tokenize_conversation(tok, t, msgs, max_len=len(last_only["input_ids"]) - 1)
    assert tokenize_conversation(tok, t, msgs, max_len=10_000)["dropped_turns"] == 0


def test_validation_errors():
    with pytest.raises(ZhllamaError, match="unknown role"):
        validate_messages([{"role": "bot", "content": "x"}])
    with pytest.raises(ZhllamaError, match="alternating"):
        validate_messages([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(ZhllamaError, match="alternating"):
        validate_messages([{"role": "assistant", "content": "x"}])
    with pytest.raises(ZhllamaError, match="alternating"):
        validate_messages([{"role": "system", "content": "s"}, {"role": "system", "content": "t"}])
    with pytest.raises(ZhllamaError, match="content must be a string"):
        validate_messages([{"role": "user", "content": None}])
    with pytest.raises(ZhllamaError, match="at least one user"):
        validate_messages([{"role": "system", "content": "s"}])
    with pytest.raises(ZhllamaError):
        validate_messages("hello")
    assert validate_messages(CONV) == CONV


def test_unknown_template_lists_known_ones(tok):
    with pytest.raises(ZhllamaError, match="atom, chatml, llama2"):
        get_template("vicuna")
    with pytest.raises(ZhllamaError, match="known templates"):
        tokenize_conversation(tok, "vicuna", CONV)
    assert get_template(TEMPLATES["atom"]) is TEMPLATES["atom"]
    assert TEMPLATES["atom"].stop == ("</s>",) and TEMPLATES["chatml"].stop == ("<|im_end|>",)
