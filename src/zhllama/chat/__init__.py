"""Chat templates shared by SFT training, serving and other engines (see ``zhllama.chat.templates``)."""

from zhllama.chat.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatTemplate,
    check_template_tokens,
    get_template,
    register_chat_template,
    validate_messages,
)
from zhllama.chat.messages import validate_tools
from zhllama.chat.tokenize import tokenize_conversation
from zhllama.chat.tools import parse_tool_calls, split_tool_calls

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "ChatTemplate",
    "check_template_tokens",
    "get_template",
    "parse_tool_calls",
    "register_chat_template",
    "split_tool_calls",
    "tokenize_conversation",
    "validate_messages",
    "validate_tools",
]
