"""The terminal chat: history across turns, the commands, errors and Ctrl-C, and a real terminal session."""

import io
import os
import sys
from pathlib import Path

import pexpect
import pytest

from zhllama.infer import SamplingParams
from zhllama.infer.chat import ChatSession, run_chat

GREEDY = SamplingParams(temperature=0, max_tokens=8)


class Recording:
    """The engine, with every ``encode_chat`` call kept: the messages and the ids it returned."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def encode_chat(self, messages, params, truncate=False):
        assert truncate  # only the context, never the chat itself, may drop turns
        ids = self.engine.encode_chat(messages, params, truncate=truncate)
        self.calls.append(([dict(m) for m in messages], ids))
        return ids


def scripted(*lines):
    """An ``input_fn`` that answers with ``lines``, then EOF as a closed stdin does; ``.left`` is what was unread."""
    pending = list(lines)

    def input_fn(prompt):
        assert prompt == "\n>>> "
        if not pending:
            raise EOFError
        return pending.pop(0)

    input_fn.left = pending
    return input_fn


def expected_reply(engine, ids, params=GREEDY):
    done = engine.generate(ids, params)
    return done.text + ("\n[max tokens reached]" if done.finish_reason == "length" else "") + "\n"


def user(text):
    return {"role": "user", "content": text}


def test_turns_accumulate_and_the_printed_reply_is_the_greedy_one(tiny_engine):
    engine, out = Recording(tiny_engine), io.StringIO()
    input_fn = scripted("你好", "", "  ", "请再介绍一下北京。", "/exit", "never read")
    run_chat(engine, GREEDY, input_fn=input_fn, out=out)
    assert input_fn.left == ["never read"]  # /exit ended it; blank lines asked nothing
    (first, first_ids), (second, second_ids) = engine.calls
    reply = tiny_engine.generate(first_ids, GREEDY).text
    assert reply  # a real reply, so that keeping it below means something
    assert first == [user("你好")]
    assert second == [user("你好"), {"role": "assistant", "content": reply}, user("请再介绍一下北京。")]
    assert out.getvalue() == ("tiny-chat chat. Commands: /reset (forget the conversation), /system TEXT "
                              "(new system prompt), /exit; Ctrl-C stops a reply\n"
                              + expected_reply(tiny_engine, first_ids) + expected_reply(tiny_engine, second_ids))


def test_reset_and_system_commands(tiny_engine):
    engine, out = Recording(tiny_engine), io.StringIO()
    session = ChatSession(engine, GREEDY, system="你是一个助手。", out=out)
    first = session.reply("你好")
    assert session.messages() == [{"role": "system", "content": "你是一个助手。"}, user("你好"),
                                  {"role": "assistant", "content": first}]
    assert engine.calls[0][0] == session.messages()[:2]
    assert session.handle("/reset") and session.history == []
    assert out.getvalue().endswith("[conversation cleared]\n")
    assert session.messages() == [{"role": "system", "content": "你是一个助手。"}]  # /reset keeps the system

    session.reply("你好")
    assert session.handle("/system  只用英文回答。 ") and session.history == []
    session.reply("你好")
    assert engine.calls[-1][0] == [{"role": "system", "content": "只用英文回答。"}, user("你好")]
    assert session.handle("/system") and session.system is None and session.history == []
    session.reply("你好")
    assert engine.calls[-1][0] == [user("你好")]

    before = out.getvalue()
    assert session.handle("/frobnicate") and len(session.history) == 2
    assert out.getvalue()[len(before):].startswith("unknown command /frobnicate; commands: /reset")
    assert not session.handle("/quit") and not session.handle("/exit")


def test_a_refused_question_is_reported_and_the_chat_goes_on(tiny_engine):
    engine, out = Recording(tiny_engine), io.StringIO()
    session = ChatSession(engine, GREEDY, out=out)
    first = session.reply("你好")
    too_long = "你好" * tiny_engine.context_length  # alone longer than the context: encode_chat refuses it
    assert session.reply(too_long) is None
    assert "error: the last message alone is" in out.getvalue()
    # max_tokens beyond the engine's limit: the prompt encodes, and the stream refuses it before generating
    session.params = SamplingParams(temperature=0, max_tokens=tiny_engine.max_tokens_limit + 1)
    assert session.reply("你好") is None
    assert out.getvalue().endswith(f"error: max_tokens must be between 1 and {tiny_engine.max_tokens_limit}, "
                                   f"got {tiny_engine.max_tokens_limit + 1}\n")
    session.params = GREEDY
    second = session.reply("再见")
    assert session.history == [user("你好"), {"role": "assistant", "content": first}, user("再见"),
                               {"role": "assistant", "content": second}]
    assert engine.calls[-1][0] == session.history[:3]


class InterruptedOnce(io.StringIO):
    """Output whose ``at``-th write raises KeyboardInterrupt, as Ctrl-C does in the middle of a reply."""

    def __init__(self, at):
        super().__init__()
        self.writes, self.at = [], at

    def write(self, text):
        self.writes.append(text)
        if len(self.writes) == self.at:
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_reply_cancels_generation_and_keeps_the_partial_text(tiny_engine, monkeypatch):
    cancels = []
    submit = tiny_engine._submit

    def submit_recording_cancels(ids, params, sink):
        cancel = submit(ids, params, sink)
        return lambda: (cancels.append(len(ids)), cancel())

    monkeypatch.setattr(tiny_engine, "_submit", submit_recording_cancels)
    out = InterruptedOnce(at=2)  # the second streamed piece: 200 tokens are far from done by then
    session = ChatSession(tiny_engine, SamplingParams(temperature=0, max_tokens=200), out=out)
    partial = session.reply("你好")
    assert partial and partial == out.writes[0]
    assert session.history == [user("你好"), {"role": "assistant", "content": partial}]
    assert out.getvalue() == partial + "\n[stopped]\n"
    prompt = tiny_engine.encode_chat([user("你好")], session.params)
    assert cancels == [len(prompt)] and tiny_engine.router.sinks == {}  # cancelled, not left running
    monkeypatch.undo()
    session.params = GREEDY
    after = session.reply("继续")  # the engine still serves, and the partial reply is part of the prompt
    assert after == tiny_engine.generate(tiny_engine.encode_chat(session.history[:3], GREEDY), GREEDY).text


@pytest.mark.parametrize("end", [EOFError, KeyboardInterrupt])
def test_eof_or_ctrl_c_at_the_prompt_ends_cleanly(tiny_engine, end):
    def input_fn(prompt):
        raise end

    out = io.StringIO()
    run_chat(tiny_engine, GREEDY, input_fn=input_fn, out=out)
    assert out.getvalue().startswith("tiny-chat chat.") and out.getvalue().endswith("Ctrl-C stops a reply\n\n")


def test_terminal_session(tiny_engine, tiny_chat_model):
    ids = tiny_engine.encode_chat([user("你好，介绍一下你自己")], GREEDY)
    reply = tiny_engine.generate(ids, GREEDY).text
    zhllama = Path(sys.executable).with_name("zhllama")
    child = pexpect.spawn(str(zhllama), ["chat", "--model", str(tiny_chat_model), "--max-tokens", "8",
                                         "--temperature", "0", "--device", "cpu"],
                          encoding="utf-8", timeout=60, env={**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"})
    try:
        child.expect_exact("tiny-chat chat. Commands: /reset")
        child.expect_exact(">>> ")
        child.sendline("你好，介绍一下你自己")
        child.expect_exact("你好，介绍一下你自己")  # the terminal's echo
        child.expect_exact(reply.replace("\n", "\r\n"))
        child.expect_exact("[max tokens reached]")
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("[conversation cleared]")
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
