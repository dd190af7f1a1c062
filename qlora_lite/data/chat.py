"""Chat templates: the tokenizer's own, one shipped here by name, or a Jinja file (`data.chat_template`); a default
system turn (`data.system_prompt`); rendering conversations to text.

`training.setup.prepare_run` sets `tokenizer.chat_template` to the template training uses, so the adapter dir and
the merged export carry it and `chat` / `generate` / `apply_chat_template` format conversations as training did.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import ConfigError

# Used when the tokenizer ships no chat template (and data.chat_template names none): a role header per turn, the
# content, and the tokenizer's EOS after each assistant turn so the model learns where an answer ends.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' if messages else '<|assistant|>\\n' }}{% endif %}"
)

# ChatML (Qwen, many instruction-tuned models): `<|im_start|>role\ncontent<|im_end|>\n` per turn.
CHATML_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3 instruct: BOS, then a header per turn, the trimmed content and <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

KNOWN_TEMPLATES = {"chatml": CHATML_CHAT_TEMPLATE, "fallback": FALLBACK_CHAT_TEMPLATE, "llama3": LLAMA3_CHAT_TEMPLATE}

# What a chosen template must render: its text has to hold every message's content.
_SAMPLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]


def _names() -> str:
    names = sorted(KNOWN_TEMPLATES)
    return ", ".join(names[:-1]) + " or " + names[-1]


def read_chat_template(setting: str) -> str:
    """The template `data.chat_template` names: a shipped one by name, else the text of a Jinja file.

    Names win over files; write `./chatml` for a file of that name. Raises `ConfigError` naming the setting for an
    unknown name, a missing or unreadable file, or an empty one.
    """
    if setting in KNOWN_TEMPLATES:
        return KNOWN_TEMPLATES[setting]
    path = Path(setting).expanduser()
    if path.is_dir():
        raise ConfigError(f"data.chat_template {setting} is a directory; give a Jinja file or one of {_names()}.")
    if not path.is_file():
        if any(sep in setting for sep in ("/", "\\")) or path.suffix:
            raise ConfigError(
                f"data.chat_template file {setting} does not exist; give an existing Jinja file or one of {_names()}."
            )
        close = difflib.get_close_matches(setting, list(KNOWN_TEMPLATES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"data.chat_template is {setting!r}, which is neither a known template{hint} nor an existing file; "
            f"use {_names()}, or the path of a Jinja file."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"data.chat_template file {setting} is not UTF-8 text ({exc.reason}); save it as UTF-8."
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"data.chat_template file {setting} cannot be read ({exc.strerror or exc}); fix its permissions."
        ) from None
    if not text.strip():
        raise ConfigError(f"data.chat_template file {setting} is empty; write a Jinja chat template into it.")
    return text


def check_chat_template(tokenizer, template: str, what: str) -> None:
    """Refuse (`ConfigError` naming `what`) a template that cannot render a short conversation or drops its text."""
    try:
        full = tokenizer.apply_chat_template(_SAMPLE, tokenize=False, chat_template=template)
        tokenizer.apply_chat_template(_SAMPLE[:1], tokenize=False, add_generation_prompt=True, chat_template=template)
    except Exception as exc:  # jinja's syntax and render errors, and exceptions the template raises itself
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")[:160]
        raise ConfigError(
            f"{what} cannot render a conversation ({first}); fix the template or use {_names()}."
        ) from None
    if not isinstance(full, str) or not all(m["content"] in full for m in _SAMPLE):
        raise ConfigError(
            f"{what} renders a conversation without its messages' text; use messages[i]['content'] in the template."
        )


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (Jinja unescapes literals like Python's unicode-escape)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped + "'"


def with_default_system(template: str, system_prompt: str) -> str:
    """`template` that first puts a system turn holding `system_prompt` before conversations that have none.

    Saved with the adapter and the export, it makes conversations without a system turn render as training
    rendered them (`data.system_prompt`). The prefix ends with a newline that `trim_blocks` removes, so the original
    template renders as it did when it stood at the start.
    """
    return (
        "{%- if messages | selectattr('role', 'equalto', 'system') | list | length == 0 %}"
        "{%- set messages = [{'role': 'system', 'content': " + _jinja_string(system_prompt) + "}] + messages %}"
        "{%- endif %}\n" + template
    )


def with_system_turn(messages: list[dict], system_prompt: str) -> list[dict]:
    """`messages` with a system turn holding `system_prompt` first when it has none (unchanged when the prompt is empty)."""
    if not system_prompt or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def chat_template(tokenizer) -> str | None:
    """The template to pass to `apply_chat_template`: None for the tokenizer's own (one or several by name), else
    `FALLBACK_CHAT_TEMPLATE`."""
    return None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text through the chat template (the fallback one if the tokenizer has none)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template(tokenizer)
    )
