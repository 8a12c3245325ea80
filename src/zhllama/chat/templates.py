"""Chat templates shared by SFT training, our server and other engines.

Every template exists twice: as Python code that renders a conversation into text *segments*, each flagged as an
assistant target or not, and as a Jinja string that is stored in the saved tokenizer's ``chat_template``. The two
render exactly the same string (the tests check this on many conversations), so ``tokenizer.apply_chat_template``,
our own server and any engine that reads ``chat_template`` all build the same prompt that training saw.

Conventions shared by all templates:

* A conversation is a list of ``{"role": ..., "content": str}`` messages: an optional single leading ``system``
  message, then ``user`` and ``assistant`` messages alternating, starting with ``user``. It may end with either.
  ``chatml`` and ``llama3`` also take tool calls and results (``zhllama.chat.messages`` checks the order, and
  ``zhllama.chat.tools`` writes them: Qwen2.5's and Meta's Llama 3.1 formats) and a ``tools`` list, as
  ``apply_chat_template(messages, tools=tools)`` does; ``atom`` and ``llama2`` refuse both.
* The literal strings ``"<s>"`` and ``"</s>"`` that the template writes are the tokenizer's BOS/EOS special tokens:
  a Hugging Face tokenizer maps them to their ids. So rendered text is tokenized with ``add_special_tokens=False``
  (the template writes BOS itself). The same strings inside message content are plain text: prompts are always
  tokenized through ``zhllama.chat.control``, which marks content before rendering (see there).
* The loss target of an assistant turn is its reply text plus its end-of-turn marker (``stop``); the header in front
  of it (``"<s>Assistant: "``, ``"[/INST]"``, ``"<|im_start|>assistant\\n"``) and all other text are not targets.
  A tool call is a target the same way; a tool result never is.
* ``add_generation_prompt=True`` appends the assistant header; it requires the conversation to end with a user
  (or tool) message (both the Python and the Jinja rendering refuse otherwise). For ``llama2`` the prompt already
  ends with ``[/INST]``, so the flag adds nothing.
* ``specials``: the control tokens a template writes that must be special tokens of the tokenizer; as plain text
  the model would learn a format nobody else reads, so ``check_template_tokens`` refuses (llama3 on Llama-2's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from zhllama.chat import tools as tl
from zhllama.chat.control import control_tokens
from zhllama.chat.messages import (  # noqa: F401  (validate_messages, ROLES: re-exported)
    ROLES,
    Turn,
    awaits_assistant,
    split_turns,
    validate_messages,
    validate_tools,
)
from zhllama.errors import ZhllamaError
from zhllama.scoring import IGNORE as IGNORE_INDEX  # noqa: F401  (re-exported: the label of a non-target token)

Segments = list[tuple[str, bool]]


# --------------------------------------------------------------------------------------------------------------
# The template type


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format: Python segment rendering plus the equivalent Jinja ``chat_template``.

    ``stop`` is the end-of-turn marker(s) that close every assistant reply; a server stops generating there.
    ``specials`` are the control tokens the tokenizer must have as special tokens; ``variables`` the template
    variables ``render`` takes, with the defaults the Jinja also uses; ``tool_format`` the tool calling format
    (``zhllama.chat.tools``), None for a template that has none.
    """

    name: str
    jinja: str
    stop: tuple[str, ...]
    description: str
    _build: Callable[..., Segments] = field(repr=False, compare=False)
    specials: tuple[str, ...] = ()
    variables: Mapping[str, str] = field(default_factory=dict, compare=False)
    tool_format: str | None = None

    def render_segments(self, messages: Any, add_generation_prompt: bool = False, tools: Any = None,
                        **variables: str) -> Segments:
        """Text segments with a flag "is an assistant target" (reply or tool call text plus its end-of-turn
        marker)."""
        system, turns = split_turns(messages)
        return self._segments(system, turns, add_generation_prompt, tools, **variables)

    def render(self, messages: Any, add_generation_prompt: bool = False, tools: Any = None, **variables: str) -> str:
        """The full prompt text; identical to rendering ``self.jinja`` with ``apply_chat_template`` (with the same
        ``tools`` and template variables, e.g. ``date_string=`` for llama3)."""
        return "".join(text for text, _ in self.render_segments(messages, add_generation_prompt, tools, **variables))

    def tool_problem(self, messages: list[dict], tools: Any = None) -> str | None:
        """Why this template cannot write these validated messages with these tools (no tool format; llama3: more
        than one call in a message), or None."""
        return tl.tool_problem(self.name, self.tool_format, messages, validate_tools(tools))

    def _segments(self, system: str | None, turns: list[Turn], add_generation_prompt: bool, tools: Any = None,
                  **variables: str) -> Segments:
        if add_generation_prompt and not awaits_assistant(turns[-1][1]):
            raise ZhllamaError("add_generation_prompt needs a conversation that ends with a user message")
        for key, value in variables.items():
            if key not in self.variables or not isinstance(value, str):
                takes = f"the string variables {', '.join(self.variables)}" if self.variables else "no variables"
                raise ZhllamaError(f"chat template {self.name} takes {takes}, not {key}={value!r}")
        tools = validate_tools(tools)
        steps = [m for _, reply in turns if isinstance(reply, tuple) for m in reply]
        if problem := tl.tool_problem(self.name, self.tool_format, steps, tools):
            raise ZhllamaError(problem)
        extra = {"tools": tools} if self.tool_format else {}
        segs = self._build(system, turns, add_generation_prompt, **extra, **{**self.variables, **variables})
        return [(text, target) for text, target in segs if text]


# Jinja pieces shared by all templates. Rendered by transformers with trim_blocks/lstrip_blocks; we also use
# whitespace control everywhere so that other Jinja engines produce the same text.
_J_PRELUDE = r"""{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = none -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if not loop_messages -%}
{{- raise_exception('a conversation needs at least one user message') -}}
{%- endif -%}
{%- if add_generation_prompt and loop_messages[-1]['role'] not in ['user', 'tool'] -%}
{{- raise_exception('add_generation_prompt needs a conversation that ends with a user message') -}}
{%- endif -%}
"""
_J_CHECK = r"""{%- set expected_role = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}
{%- if message['role'] != expected_role -%}
{{- raise_exception('roles must be an optional system message, then user/assistant alternating, starting with user') -}}
{%- endif -%}
"""


# --------------------------------------------------------------------------------------------------------------
# atom: the seeds' format


def _atom(system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
    segs: Segments = []
    if system is not None:
        segs.append((f"<s>System: {system}\n</s>", False))
    for user, reply in turns:
        segs.append((f"<s>Human: {user}\n</s>", False))
        if reply is not None:
            segs.append(("<s>Assistant: ", False))
            segs.append((f"{reply}\n</s>", True))
    if add_generation_prompt:
        segs.append(("<s>Assistant: ", False))
    return segs


_ATOM_JINJA = (
    _J_PRELUDE
    + tl.jinja_no_tools("atom")
    + r"""{%- if system_message is not none -%}
{{- '<s>System: ' + system_message + '\n</s>' -}}
{%- endif -%}
{%- for message in loop_messages -%}
"""
    + _J_CHECK
    + tl.jinja_no_tool_calls("atom")
    + r"""{%- if message['role'] == 'user' -%}
{{- '<s>Human: ' + message['content'] + '\n</s>' -}}
{%- else -%}
{{- '<s>Assistant: ' + message['content'] + '\n</s>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<s>Assistant: ' -}}
{%- endif -%}
"""
)


# --------------------------------------------------------------------------------------------------------------
# llama2: Meta's reference format (llama/generation.py, chat_completion)

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _llama2(system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
    """Exactly Meta's reference: the system text is folded into the first user message as
    ``B_SYS + system + E_SYS + user`` (the system text itself is not stripped); then every prompt is
    ``f"{bos}{B_INST} {prompt.strip()} {E_INST}"`` and every answer ``f" {answer.strip()} {eos}"``. So the only
    stripping is of the whole (system-folded) user text and of the assistant text.
    """
    segs: Segments = []
    for i, (user, reply) in enumerate(turns):
        content = f"{B_SYS}{system}{E_SYS}{user}" if i == 0 and system is not None else user
        segs.append((f"<s>{B_INST} {content.strip()} {E_INST}", False))
        if reply is not None:
            segs.append((f" {reply.strip()} </s>", True))
    return segs


_LLAMA2_JINJA = (
    _J_PRELUDE
    + tl.jinja_no_tools("llama2")
    + r"""{%- for message in loop_messages -%}
"""
    + _J_CHECK
    + tl.jinja_no_tool_calls("llama2")
    + r"""{%- if message['role'] == 'user' -%}
{%- if loop.first and system_message is not none -%}
{%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] -%}
{%- else -%}
{%- set content = message['content'] -%}
{%- endif -%}
{{- '<s>[INST] ' + (content | trim) + ' [/INST]' -}}
{%- else -%}
{{- ' ' + (message['content'] | trim) + ' </s>' -}}
{%- endif -%}
{%- endfor -%}
"""
)


# --------------------------------------------------------------------------------------------------------------
# chatml


def _chatml(system: str | None, turns: list[Turn], add_generation_prompt: bool, tools: list | None) -> Segments:
    """ChatML. A tokenizer that has ``<|im_start|>`` and ``<|im_end|>`` as special tokens (Qwen2's) encodes each as
    one id, since rendered text is tokenized with its special tokens recognised; the Llama-2 vocabulary has neither,
    so there they stay plain text (several ordinary tokens each) and ChatML still works, as it always did. Hence
    no ``specials``. The target is the reply plus ``<|im_end|>``; the newline after it is not. Tools: Qwen2.5's
    format (``zhllama.chat.tools``)."""
    segs: Segments = [(tl.chatml_system(system, tools), False)]
    for user, reply in turns:
        segs.append((f"<|im_start|>user\n{user}<|im_end|>\n", False))
        if isinstance(reply, tuple):
            segs += tl.chatml_exchange(reply)
        elif reply is not None:
            segs.append(("<|im_start|>assistant\n", False))
            segs.append((f"{reply}<|im_end|>", True))
            segs.append(("\n", False))
    if add_generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


_CHATML_JINJA = (
    _J_PRELUDE
    + tl.CHATML_JINJA_SYSTEM
    + r"""{%- for message in loop_messages -%}
"""
    + tl.JINJA_TOOL_ORDER
    + tl.CHATML_JINJA_MESSAGE
    + r"""{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
)


# --------------------------------------------------------------------------------------------------------------
# llama3: Meta's Llama 3.1/3.2/3.3 Instruct format (tools: Llama 3.1's JSON tool calls)

LLAMA3_DATE = "26 Jul 2024"  # the Today Date Meta's 3.1 template writes when no date_string is given
L3_BOS, L3_EOT = "<|begin_of_text|>", "<|eot_id|>"


def _l3_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _llama3(system: str | None, turns: list[Turn], add_generation_prompt: bool, tools: list | None,
            date_string: str) -> Segments:
    """Exactly Meta's template without tools: a system block is always written (the system message, stripped, may
    be empty), with the knowledge cut-off and ``date_string``; every message's content is stripped (Jinja ``trim``
    is ``str.strip``). The target is the stripped reply plus ``<|eot_id|>``. (Meta's 3.2/3.3 templates write
    today's date when given none; we keep 3.1's fixed default, so that serving sees the text training saw.) Tools:
    Meta's Llama 3.1 JSON tool calls (``zhllama.chat.tools``)."""
    segs: Segments = [(L3_BOS + _l3_header("system") + ("Environment: ipython\n" if tools else "")
                       + "Cutting Knowledge Date: December 2023\n"
                       f"Today Date: {date_string}\n\n{(system or '').strip()}{L3_EOT}", False)]
    for i, (user, reply) in enumerate(turns):
        user = tl.llama3_tools_user(user, tools) if i == 0 and tools else user.strip()
        segs.append((_l3_header("user") + user + L3_EOT, False))
        if isinstance(reply, tuple):
            segs += tl.llama3_exchange(reply, _l3_header, L3_EOT)
        elif reply is not None:
            segs.append((_l3_header("assistant"), False))
            segs.append((reply.strip() + L3_EOT, True))
    if add_generation_prompt:
        segs.append((_l3_header("assistant"), False))
    return segs


# The literal <|begin_of_text|>, not Meta's bos_token (as the others write <s>): a tokenizer may name no BOS.
_LLAMA3_JINJA = (
    _J_PRELUDE
    + r"""{%- if date_string is not defined -%}
{%- set date_string = '""" + LLAMA3_DATE + r"""' -%}
{%- endif -%}
{{- '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n' -}}
{%- if tools -%}
{{- 'Environment: ipython\n' -}}
{%- endif -%}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' -}}
{%- if system_message is not none -%}
{{- system_message | trim -}}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- for message in loop_messages -%}
"""
    + tl.JINJA_TOOL_ORDER
    + tl.LLAMA3_JINJA_FIRST_USER
    + tl.LLAMA3_JINJA_TOOL_MESSAGES
    + r"""{%- else -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}
{{- (message['content'] | trim) + '<|eot_id|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""
)


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="atom",
            jinja=_ATOM_JINJA,
            stop=("</s>",),
            description="<s>Human: …\\n</s><s>Assistant: …\\n</s> (Atom/FlagAlpha Llama2-Chinese); "
            "a system message becomes <s>System: …\\n</s> first",
            _build=_atom,
            specials=("<s>", "</s>"),
        ),
        ChatTemplate(
            name="llama2",
            jinja=_LLAMA2_JINJA,
            stop=("</s>",),
            description="Meta's Llama-2-chat: <s>[INST] <<SYS>>\\n…\\n<</SYS>>\\n\\n… [/INST] … </s>",
            _build=_llama2,
            specials=("<s>", "</s>"),
        ),
        ChatTemplate(
            name="chatml",
            jinja=_CHATML_JINJA,
            stop=("<|im_end|>",),
            description="ChatML: <|im_start|>role\\n…<|im_end|>\\n (markers are single tokens where the vocabulary "
            "has them, Qwen2's; plain text in Llama-2's)",
            _build=_chatml,
            tool_format=tl.CHATML,
        ),
        ChatTemplate(
            name="llama3",
            jinja=_LLAMA3_JINJA,
            stop=(L3_EOT,),
            description="Meta's Llama 3.1/3.2/3.3 Instruct: <|begin_of_text|><|start_header_id|>role"
            "<|end_header_id|>\\n\\n…<|eot_id|>, with Meta's system block (date_string, default 26 Jul 2024)",
            _build=_llama3,
            specials=(L3_BOS, "<|start_header_id|>", "<|end_header_id|>", L3_EOT),
            variables=MappingProxyType({"date_string": LLAMA3_DATE}),  # read-only: TEMPLATES is shared
            tool_format=tl.LLAMA3,
        ),
    )
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The registered template called ``name`` (a ChatTemplate is returned as is)."""
    if isinstance(name, ChatTemplate):
        return name
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ZhllamaError(f"unknown chat template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}") from None


def check_template_tokens(tokenizer: Any, template: str | ChatTemplate,
                          tokens: tuple[str, ...] | None = None) -> ChatTemplate:
    """The template, if the tokenizer has each of its ``specials`` as a special or added token (``tokens``: its
    ``control_tokens``, when already looked up), else a one-line ZhllamaError naming them. Not "encodes to one id":
    a plain piece spelled ``<s>`` (Qwen2 has one) does, but it is not the BOS the template means."""
    tpl = get_template(template)
    if tpl.specials:
        have = set(control_tokens(tokenizer) if tokens is None else tokens)
        missing = [t for t in tpl.specials if t not in have]
        if missing:
            raise ZhllamaError(f"chat template {tpl.name} needs the special tokens {', '.join(missing)}, which this "
                               "tokenizer does not have; choose a template made for its vocabulary")
    return tpl


def register_chat_template(tokenizer: Any, template: str | ChatTemplate) -> Any:
    """Store the template's Jinja as ``tokenizer.chat_template`` (saved by ``save_pretrained``); returns the tokenizer.
    A template whose special tokens the tokenizer lacks is refused (``check_template_tokens``).

    For a folder written by ``zhllama.tokenizer.hf.write_hf_tokenizer``, pass ``chat_template=get_template(n).jinja``.
    """
    tokenizer.chat_template = check_template_tokens(tokenizer, template).jinja
    return tokenizer
