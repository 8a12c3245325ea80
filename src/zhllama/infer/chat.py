"""`zhllama chat`: a streaming multi-turn chat in the terminal.

The whole conversation is sent every turn, and only ``encode_chat(..., truncate=True)`` shortens it: it drops the
oldest turns when the context is full and never the system message or the new question. So the chat never forgets
a turn it still has room for.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from zhllama.errors import ZhllamaError
from zhllama.infer.engine import Engine
from zhllama.infer.params import SamplingParams

PROMPT = "\n>>> "
COMMANDS = "/reset (forget the conversation), /system TEXT (new system prompt), /exit; Ctrl-C stops a reply"


class ChatSession:
    """The conversation state and the commands; ``run_chat`` only adds the input loop around it."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None,
                 out: TextIO | None = None):
        self.engine, self.params = engine, params
        self.out = out if out is not None else sys.stdout  # read now, not at import: stdout may be redirected
        self.system = system or None
        self.history: list[dict[str, str]] = []  # user/assistant alternating, never the system message

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def handle(self, line: str) -> bool:
        """One line of input: a command or a question. False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return self.command(line)
        self.reply(line)
        return True

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history.clear()
            self._say("[conversation cleared]")
        elif name == "/system":
            # A new system prompt changes who is answering, so the old turns no longer fit: start afresh.
            self.system = arg.strip() or None
            self.history.clear()
            self._say(f"[system prompt set: {self.system}; conversation cleared]" if self.system
                      else "[system prompt cleared; conversation cleared]")
        else:
            self._say(f"unknown command {name}; commands: {COMMANDS}")
        return True

    def reply(self, question: str) -> str | None:
        """Stream the answer to ``question`` to ``out`` and keep both in the history; None when it failed."""
        self.history.append({"role": "user", "content": question})
        parts: list[str] = []
        stream = None
        try:
            ids = self.engine.encode_chat(self.messages(), self.params, truncate=True)
            stream = self.engine.stream(ids, self.params)
            for delta in stream:
                if delta.finish_reason == "error":
                    raise ZhllamaError(f"generation failed: {delta.error}")
                self.out.write(delta.text)
                self.out.flush()
                parts.append(delta.text)  # after the write: the history keeps what the user saw
                if delta.finish_reason == "length":
                    self._say("\n" + self._dim("[max tokens reached]"), newline=False)
        except ZhllamaError as exc:
            # The question stays unanswered; keeping it would break the user/assistant alternation.
            self.history.pop()
            self._say(("\n" if parts else "") + f"error: {exc}")
            return None
        except KeyboardInterrupt:
            # What was said so far is part of the conversation: the next question may refer to it.
            self._say("\n" + self._dim("[stopped]"), newline=False)
        finally:
            if stream is not None:
                stream.close()  # the generator's finally cancels the generation when it did not finish
        text = "".join(parts)
        self.history.append({"role": "assistant", "content": text})
        self.out.write("\n")
        self.out.flush()
        return text

    def _say(self, text: str, newline: bool = True) -> None:
        self.out.write(text + ("\n" if newline else ""))
        self.out.flush()

    def _dim(self, text: str) -> str:
        isatty = getattr(self.out, "isatty", None)
        return f"\033[2m{text}\033[0m" if isatty is not None and isatty() else text


def run_chat(engine: Engine, params: SamplingParams, system: str | None = None,
             input_fn: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    """Read lines until /exit, EOF or Ctrl-C at the prompt, answering each one as it streams (to ``out``, by
    default the current ``sys.stdout``)."""
    out = out if out is not None else sys.stdout
    if input_fn is input and sys.stdin.isatty():
        # readline makes input() edit lines (arrow keys, backspace over Chinese characters); Windows has none.
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
    session = ChatSession(engine, params, system, out)
    out.write(f"{engine.name} chat. Commands: {COMMANDS}\n")
    out.flush()
    while True:
        try:
            line = input_fn(PROMPT)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        if not session.handle(line):
            break
    out.flush()
