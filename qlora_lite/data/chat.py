"""Rendering conversations to text: the tokenizer's chat template, or a fallback one when it ships none."""

from __future__ import annotations

# Used only when the tokenizer ships no chat template: a role header per turn, the content, and the
# tokenizer's EOS after each assistant turn so the model learns where an answer ends.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' if messages else '<|assistant|>\\n' }}{% endif %}"
)


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or `FALLBACK_CHAT_TEMPLATE` when it has none."""
    return getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text through the chat template (the fallback one if the tokenizer has none)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template(tokenizer)
    )
