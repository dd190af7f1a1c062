"""Prompts as token ids: chat turns through the tokenizer's chat template (or the fallback training used),
or plain text as a prompt/completion record is trained."""

from __future__ import annotations


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the generation prompt, as training rendered chat records."""
    from ..data.chat import render_chat

    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a plain prompt, with the tokenizer's special tokens as a prompt/completion record gets them."""
    return tokenizer(text, add_special_tokens=True).input_ids
