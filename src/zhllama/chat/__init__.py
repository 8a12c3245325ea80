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
from zhllama.chat.tokenize import tokenize_conversation

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "ChatTemplate",
    "check_template_tokens",
    "get_template",
    "register_chat_template",
    "tokenize_conversation",
    "validate_messages",
]
