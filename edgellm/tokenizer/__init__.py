"""Tokenizers, conversation templates, chat-template rendering and streaming detokenization."""

from edgellm.tokenizer.conversation import (
    TEMPLATE_NAMES,
    Conversation,
    get_template,
    load_template,
    prompt_text,
    render,
    split_messages,
)
from edgellm.tokenizer.jinja import ChatTemplate, render_chat_template
from edgellm.tokenizer.streamer import StopMatcher, StreamDecoder
from edgellm.tokenizer.tokenizer import Tokenizer

__all__ = [
    "TEMPLATE_NAMES",
    "ChatTemplate",
    "Conversation",
    "StopMatcher",
    "StreamDecoder",
    "Tokenizer",
    "get_template",
    "load_template",
    "prompt_text",
    "render",
    "render_chat_template",
    "split_messages",
]
