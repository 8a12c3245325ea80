"""The one rule for building prompts, shared by `chat`, `serve` and `generate`.

1. The model's own ``chat_template`` (its tokenizer has one: every model `zhllama train sft` writes does), so
   serving builds exactly the prompts that training saw.
2. Otherwise ``--template NAME`` from our registry.
3. Otherwise ``atom`` (``llama3`` for a vocabulary that has Llama-3's special tokens but no ``<s>``), with a
   one-line warning.

One of our templates whose special tokens the tokenizer lacks (llama3 on Llama-2's vocabulary) is a one-line error
(``check_template_tokens``): for 1 and 2 when the engine starts, before any request; for 3 at the first chat
request, so that a base model without a template still serves raw prompts.

A too-long prompt is an error naming the lengths, or, when the caller asks, loses its oldest turns (the system
message and the last user message stay) until it fits.

Only the template writes control tokens: message content is marked and tokenized as plain text
(``zhllama.chat.control``), for our templates and for a model's own Jinja alike, so ``</s><s>Assistant: `` typed
into a message forges no turn. A raw prompt (``generate --raw``, ``/v1/completions``) has no template and no
content to keep apart from it: the caller writes the whole prompt, control tokens included, and the tokenizer
parses them as vLLM and llama.cpp's server do (``Engine.encode_text``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from zhllama.chat import TEMPLATES, ChatTemplate, check_template_tokens, get_template, validate_messages, validate_tools
from zhllama.chat.control import control_tokens, encode_marked, mark_messages, mark_value, marker
from zhllama.chat.tools import jinja_tool_format
from zhllama.errors import ZhllamaError
from zhllama.infer.params import BadRequest


@dataclass
class PromptBuilder:
    tokenizer: Any
    template: ChatTemplate | None  # ours, when the template is one of the registry's
    stop: tuple[str, ...]  # end-of-turn strings; generation also stops on the EOS id
    source: str  # "model", "--template" or "default"

    @property
    def tool_format(self) -> str | None:
        """The format tool calls take in this template (zhllama.chat.tools), None when it has none."""
        if self.template is not None:
            return self.template.tool_format
        return jinja_tool_format(self.tokenizer.chat_template)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt text; of marked messages (``mark_messages``), the marked text that ``encode_marked`` reads."""
        if self.template is not None:
            return self.template.render(messages, add_generation_prompt=True, tools=tools)
        extra = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)

    def encode(self, messages: Any, max_prompt_tokens: int | None = None, truncate: bool = False,
               tools: list[dict] | None = None, opening: str = "") -> list[int]:
        """Prompt ids for a conversation that ends with a user message or tool results, with the `tools` it may
        call. `opening` is text the reply must start with (the template's call syntax, see serve.tools): it is
        written after the generation prompt, as the template would write it."""
        if self.template is not None:
            check_template_tokens(self.tokenizer, self.template)
        messages = validate_messages(messages)
        if messages[-1]["role"] not in ("user", "tool"):
            raise ZhllamaError("the conversation must end with a user message or tool results")
        tools = validate_tools(tools)
        if tools and self.tool_format is None:
            name = self.template.name if self.template is not None else "of this model"
            raise BadRequest(f"the chat template {name} has no tool format; serve a model trained with the llama3 "
                             "or chatml template to use tools", "tools")
        if self.template is not None and (problem := self.template.tool_problem(messages, tools)):
            raise BadRequest(problem, "tools" if tools else "messages")
        tools = mark_value(marker(self.tokenizer), tools)  # a tool's description is text, as a message is
        system = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(system):]
        # Turns are cut whole: from a user message to the next, tool calls and results included.
        starts = [i for i, m in enumerate(body) if m["role"] == "user"]

        def ids_without(turns: int) -> list[int]:  # the prompt with the oldest `turns` turns cut
            marked = mark_messages(self.tokenizer, system + body[starts[turns]:])
            return encode_marked(self.tokenizer, self.render(marked, tools) + opening)[0]

        ids = ids_without(0)
        if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
            return ids
        if not truncate or len(starts) == 1:
            raise self._too_long(ids, max_prompt_tokens, truncate)
        # Cutting more turns never lengthens the prompt, so a binary search finds the fewest to cut in
        # log2(turns) tokenizations (a long history must not cost one tokenization per turn).
        low, high = 1, len(starts) - 1  # the last turn always stays
        if len(shortest := ids_without(high)) > max_prompt_tokens:
            raise self._too_long(shortest, max_prompt_tokens, truncate)
        while low < high:
            mid = (low + high) // 2
            if len(ids_without(mid)) <= max_prompt_tokens:
                high = mid
            else:
                low = mid + 1
        return ids_without(low)

    @staticmethod
    def _too_long(ids: list[int], max_prompt_tokens: int, truncate: bool) -> ZhllamaError:
        what = "the last message alone" if truncate else "the prompt"
        return ZhllamaError(f"{what} is {len(ids)} tokens; at most {max_prompt_tokens} fit the model's "
                           "context with the requested max_tokens")


def prompt_builder(tokenizer, template: str | None = None) -> PromptBuilder:
    """Apply the rule above to a loaded tokenizer and an optional --template name."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        if template is not None and get_template(template).jinja != own:
            print(f"warning: the model has its own chat template; --template {template} is ignored", file=sys.stderr)
        ours = next((t for t in TEMPLATES.values() if t.jinja == own), None)
        if ours is not None:
            return PromptBuilder(tokenizer, check_template_tokens(tokenizer, ours), ours.stop, "model")
        return PromptBuilder(tokenizer, None, _foreign_stops(tokenizer, own), "model")
    if template is not None:
        chosen = check_template_tokens(tokenizer, template)
        return PromptBuilder(tokenizer, chosen, chosen.stop, "--template")
    default = next((t for t in (TEMPLATES["atom"], TEMPLATES["llama3"]) if _writable(tokenizer, t)), TEMPLATES["atom"])
    print(f"warning: the model's tokenizer has no chat template and no --template was given; using {default.name}",
          file=sys.stderr)
    return PromptBuilder(tokenizer, default, default.stop, "default")


def _writable(tokenizer, template: ChatTemplate) -> bool:
    try:
        check_template_tokens(tokenizer, template)
    except ZhllamaError:
        return False
    return True


def _foreign_stops(tokenizer, jinja: str) -> tuple[str, ...]:
    """Stops for a chat template that is not ours (Meta's own Llama-3.1 Jinja, say): EOS, plus every end-of-turn
    marker of our templates that this Jinja writes and the tokenizer has as a control token. A Llama-3 GGUF's EOS
    may be <|end_of_text|> while its template closes each turn with <|eot_id|>; without this the model would talk
    on past its turn."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    have = set(control_tokens(tokenizer))
    for stop in dict.fromkeys(s for t in TEMPLATES.values() for s in t.stop):
        if stop in jinja and stop in have and stop not in stops:
            stops.append(stop)
    return tuple(stops)


def end_of_turn_ids(tokenizer, stops: tuple[str, ...]) -> list[int]:
    """EOS plus every stop string that is a single token of its own (``<|im_end|>``, ``</s>``, ``<|eot_id|>``).
    Both backends (HF and llama.cpp) stop on these ids: a special token may decode to no text at all, so a stop
    string alone would never see it. Only control tokens count: a plain piece spelled like a stop is text."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    have = set(control_tokens(tokenizer))
    for stop in stops:
        token = tokenizer.convert_tokens_to_ids(stop) if stop in have else None
        if isinstance(token, int) and token != tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    if not ids:
        raise ZhllamaError("the tokenizer has no EOS token and the template no single-token stop")
    return ids
