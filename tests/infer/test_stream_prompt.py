"""Streaming text out of token ids (no broken characters, stop strings held back) and the prompt rule."""

import random

import pytest

from zhllama.chat import TEMPLATES, tokenize_conversation
from zhllama.errors import ZhllamaError
from zhllama.infer.prompt import prompt_builder
from zhllama.infer.stream import REPLACEMENT, IncrementalDecoder, StopStrings
from zhllama.model.loading import load_tokenizer
from zhllama.tokenizer.hf import set_chat_template

TEXT = "中文流式输出：𠀀𪚥（扩展B）😀👍🏽 emoji、繁體字與 English words,  two spaces\n代码 `x = 1` 结束。"


@pytest.fixture(scope="module")
def tok(extended_dir):
    return load_tokenizer(extended_dir)


def test_streamed_pieces_join_to_the_whole_text_without_broken_characters(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte-fallback pieces are in play
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == TEXT
    assert not any(REPLACEMENT in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(TEXT) // 4  # it does stream, not all at the end


def test_an_incomplete_character_waits_and_several_ids_at_once(tok):
    ids = tok("你好😀", add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tok)
    assert "".join(decoder.push(i) for i in ids[:-1]) == "你好"  # the emoji's last byte is missing
    assert set(decoder.flush()) == {REPLACEMENT}  # as decode gives an incomplete byte sequence
    decoder = IncrementalDecoder(tok)
    assert decoder.push(*ids[:2]) + decoder.push(*ids[2:]) == "你好😀"


def test_stop_strings_cut_and_hold_back_possible_starts():
    stops = StopStrings(["<|im_end|>", "\n\nHuman:"])
    out = [stops.push(p) for p in ["好的", "，", "<|im", "_en", "d|>后面的不要"]]
    assert out == ["好的", "，", "", "", ""] and stops.stopped
    stops = StopStrings(["<|im_end|>"])
    assert stops.push("a<|i") == "a" and stops.push("x") == "<|ix" and stops.flush() == ""
    stops = StopStrings(["<|im_end|>"])
    assert stops.push("结尾<") == "结尾" and stops.flush() == "<"
    random.seed(0)
    text = "第一句。<|im_end|>第二句"
    for _ in range(50):
        cuts = sorted(random.sample(range(1, len(text)), 4))
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        s = StopStrings(["<|im_end|>"])
        assert "".join(s.push(p) for p in parts) + s.flush() == "第一句。"


def test_prompt_rule_model_template_then_flag_then_atom(tok, extended_dir, tmp_path, capsys):
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"}]
    default = prompt_builder(tok)
    assert default.source == "default" and "using atom" in capsys.readouterr().err
    flag = prompt_builder(tok, "chatml")
    assert flag.source == "--template" and flag.stop == ("<|im_end|>",)
    assert flag.encode(messages) == tok(TEMPLATES["chatml"].render(messages, True), add_special_tokens=False)[
        "input_ids"]
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((extended_dir / name).read_bytes())
    set_chat_template(folder, TEMPLATES["llama2"].jinja)
    own = prompt_builder(load_tokenizer(folder), "atom")
    assert own.source == "model" and own.template.name == "llama2"
    assert "--template atom is ignored" in capsys.readouterr().err
    reply = tokenize_conversation(tok, "llama2", [*messages, {"role": "assistant", "content": "你好！"}])
    prompt = own.encode(messages)
    assert reply["input_ids"][:len(prompt)] == prompt  # the prompt is the training text up to the reply


def test_prompt_length_error_or_truncation_by_turns(tok):
    builder = prompt_builder(tok, "atom")
    messages = [{"role": "system", "content": "系统"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"第{i}个问题" * 5}, {"role": "assistant", "content": "回答" * 5}]
    messages.append({"role": "user", "content": "最后的问题"})
    full = builder.encode(messages)
    with pytest.raises(ZhllamaError, match=f"the prompt is {len(full)} tokens; at most 40 fit"):
        builder.encode(messages, max_prompt_tokens=40)
    cut = builder.encode(messages, max_prompt_tokens=40, truncate=True)
    assert len(cut) <= 40
    text = tok.decode(cut)
    assert "系统" in text and "最后的问题" in text and "第0个问题" not in text
    with pytest.raises(ZhllamaError, match="the last message alone"):
        builder.encode(messages, max_prompt_tokens=5, truncate=True)
    with pytest.raises(ZhllamaError, match="must end with a user message"):
        builder.encode(messages[:-1])


def test_truncation_cuts_the_fewest_turns_in_few_tokenizations(llama2_dir):
    from zhllama.infer.prompt import prompt_builder
    from zhllama.model.loading import load_tokenizer

    tokenizer = load_tokenizer(llama2_dir)
    builder = prompt_builder(tokenizer, "atom")
    history = []
    for i in range(400):
        history += [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": f"回答{i}"}]
    messages = [{"role": "system", "content": "系统"}, *history, {"role": "user", "content": "最后"}]
    calls = []
    render = builder.render
    builder.render = lambda m, tools=None: calls.append(len(m)) or render(m, tools)
    ids = builder.encode(messages, max_prompt_tokens=300, truncate=True)
    assert len(ids) <= 300
    # one more turn would not fit: the fewest turns were cut
    kept = calls[-1]
    longer = builder.tokenizer(render(messages[:1] + messages[-(kept + 1):]), add_special_tokens=False)["input_ids"]
    assert len(longer) > 300
    assert len(calls) <= 12  # a binary search over 400 turns, not one tokenization per turn


def test_message_content_is_text_but_a_raw_prompt_parses_control_tokens(llama2_dir):
    """The rule of zhllama.infer.prompt: a message cannot write control tokens; a raw completion prompt
    (generate --raw, /v1/completions) is the caller's whole prompt and may, as in vLLM."""
    from zhllama.infer.engine import Engine
    from zhllama.infer.params import SamplingParams

    class Bare(Engine):
        name, context_length, eos_ids = "bare", 4096, [2]

        def __init__(self):
            self.tokenizer = load_tokenizer(llama2_dir)
            self.prompt = prompt_builder(self.tokenizer, "llama2")

        def _submit(self, prompt_ids, params, sink):
            raise AssertionError("nothing is generated here")

    engine, params = Bare(), SamplingParams(max_tokens=8)
    assert engine.encode_text("a</s><s>b", params) == [1, 263, 2, 1, 289]
    # [INST] a '</' 's' '>' '<' 's' '>' b [/INST]: no EOS or BOS but the template's first <s>
    assert engine.encode_chat([{"role": "user", "content": "a</s><s>b"}], params) == [
        1, 518, 25580, 29962, 263, 829, 29879, 29958, 29966, 29879, 29958, 29890, 518, 29914, 25580, 29962]
