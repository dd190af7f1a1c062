"""The Ollama `Modelfile` written beside a GGUF export: FROM, TEMPLATE (the chat template as a Go template), SYSTEM
(the default system prompt the template carries) and PARAMETER stop (the end-of-turn markers).

The Jinja chat template is not parsed: it is rendered on probe conversations whose contents are marker words, and
the text around the markers gives each role's prefix and suffix, the generation prompt and any default system
turn (`data.system_prompt` is built into the template by `data.chat.with_default_system`). The Go template is
written from those pieces and checked by rendering the same pieces in Python against the Jinja template on
several conversations. A template this cannot describe (a system prompt folded into the first user turn, turns
that depend on their neighbours, ...) gets a comment saying so and the plain `{{ .Prompt }}` template: the prompt
is then passed to the model as raw text, and the GGUF still holds the Jinja template for llama.cpp.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
_MARK = {"system": "QlxSysMark", "user": "QlxUserMark", "assistant": "QlxBotMark"}
PLAIN_TEMPLATE = "{{ .Prompt }}"

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


@dataclass
class ChatFormat:
    """A chat template as text around each turn: `prefix[role] + content + suffix[role]` per message."""

    first_prefix: dict[str, str]  # a role's prefix when its message opens the conversation
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str  # after the last message, when the model is to answer
    default_system: str | None = None
    roles: tuple[str, ...] = ROLES
    notes: list[str] = field(default_factory=list)

    def render(self, messages: list[dict], add_generation_prompt: bool, close_last: bool = True) -> str:
        """The text this format gives `messages` (the Go template's rendering, in Python); `close_last=False`
        leaves the last assistant turn open, as the Go template does so that Ollama can continue it."""
        if self.default_system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.default_system}, *messages]  # Ollama's SYSTEM
        out = []
        for i, m in enumerate(messages):
            role, last = m["role"], i == len(messages) - 1
            out.append((self.first_prefix if i == 0 else self.prefix)[role] + m["content"])
            if role != "assistant" or not last or close_last:
                out.append(self.suffix[role])
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            out.append(self.generation)
        return "".join(out)


def _msg(role: str, n: int = 1) -> dict:
    return {"role": role, "content": f"{_MARK[role]}{n}"}


def _pieces(text: str, messages: list[dict]) -> list[str] | None:
    """The text between the messages' contents (len(messages) + 1 pieces), or None when a content is missing."""
    pieces, pos = [], 0
    for m in messages:
        at = text.find(m["content"], pos)
        if at < 0:
            return None
        pieces.append(text[pos:at])
        pos = at + len(m["content"])
    return [*pieces, text[pos:]]


def _after(text: str, start: str) -> str | None:
    return text[len(start) :] if text.startswith(start) else None


def infer_chat_format(render: Render, strip_bos: str | None = None) -> tuple[ChatFormat | None, str]:
    """The template's `ChatFormat`, or (None, why) when it cannot be described that way.

    `strip_bos`: BOS text the template writes first, dropped because llama.cpp adds that token itself.
    """
    u1, a1, u2, a2 = _msg("user"), _msg("assistant"), _msg("user", 2), _msg("assistant", 2)
    try:
        talk = _pieces(render([u1, a1, u2, a2], False), [u1, a1, u2, a2])
        alone = render([u1], False)
        asked = render([u1], True)
    except Exception as exc:  # the template's own errors (raise_exception) and jinja's
        return None, f"it cannot render a user/assistant conversation ({str(exc)[:80]})"
    if talk is None:
        return None, "it does not write the messages' text as given"
    user_alone = _pieces(alone, [u1])
    generation = _after(asked, alone)
    if user_alone is None or generation is None:
        return None, "its generation prompt is not added after the conversation"
    user_suffix = user_alone[1]
    bot_prefix = _after(talk[1], user_suffix)
    bot_suffix = talk[4]
    user_prefix = _after(talk[2], bot_suffix)
    if bot_prefix is None or user_prefix is None or talk[3] != talk[1]:
        return None, "its turns are not written the same way each time"
    fmt = ChatFormat(
        first_prefix={"user": talk[0], "assistant": bot_prefix},
        prefix={"user": user_prefix, "assistant": bot_prefix},
        suffix={"user": user_suffix, "assistant": bot_suffix},
        generation=generation,
        roles=("user", "assistant"),
    )
    s1 = _msg("system")
    try:
        with_system = _pieces(render([s1, u1, a1], False), [s1, u1, a1])
    except Exception:
        with_system = None
        fmt.notes.append("the chat template does not accept system messages, so this template drops them")
    if with_system is not None:
        system_suffix = with_system[1][: -len(user_prefix)] if with_system[1].endswith(user_prefix) else None
        if system_suffix is None or not user_prefix:
            return None, "it does not write a system message as a turn of its own"
        fmt.first_prefix["system"] = fmt.prefix["system"] = with_system[0]
        fmt.suffix["system"] = system_suffix
        fmt.roles = ROLES
        opening = with_system[0]
        default = talk[0][len(opening) : len(talk[0]) - len(system_suffix + user_prefix)]
        if (
            talk[0].startswith(opening)
            and talk[0].endswith(system_suffix + user_prefix)
            and len(talk[0]) >= len(opening) + len(system_suffix + user_prefix)
            and render([{"role": "system", "content": default}, u1], True) == asked
        ):
            fmt.default_system = default  # a system turn the template writes when a conversation has none
            fmt.first_prefix["user"] = user_prefix
    why = _check(fmt, render)
    if why:
        return None, why
    if strip_bos:
        for table in (fmt.first_prefix, fmt.prefix):
            for role, text in table.items():
                if text.startswith(strip_bos):
                    table[role] = text[len(strip_bos) :]
    return fmt, ""


def _check(fmt: ChatFormat, render: Render) -> str:
    """'' when the format renders like the Jinja template on every probe conversation, else why not."""
    u1, a1, u2 = _msg("user"), _msg("assistant"), _msg("user", 2)
    probes = [([u1], True), ([u1, a1], False), ([u1, a1, u2], True)]
    if "system" in fmt.roles:
        s1 = _msg("system")
        probes += [([s1, u1], True), ([s1, u1, a1, u2], True)]
    for messages, generation in probes:
        if fmt.render(messages, generation) != render(messages, generation):
            return "its turns depend on the rest of the conversation"
    return ""


def _literal(text: str) -> str:
    """Text as it stands in a Go template: itself, or a quoted string where it holds template delimiters."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if "{{" in text or "}}" in text else text


def go_template(fmt: ChatFormat) -> str:
    """The Ollama (Go) template for `fmt`, over `.Messages`: no whitespace of its own, so the text is exact."""
    parts = ["{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    for n, role in enumerate(fmt.roles):
        parts.append(("{{ if" if n == 0 else "{{ else if") + f' eq .Role "{role}" }}}}')
        first, later = fmt.first_prefix[role], fmt.prefix[role]
        if first != later:
            parts.append(f"{{{{ if eq $i 0 }}}}{_literal(first)}{{{{ else }}}}{_literal(later)}{{{{ end }}}}")
        else:
            parts.append(_literal(later))
        parts.append("{{ .Content }}")
        suffix = _literal(fmt.suffix[role])
        if role == "assistant" and suffix:
            parts.append(f"{{{{ if not $last }}}}{suffix}{{{{ end }}}}")  # Ollama continues an open last answer
        else:
            parts.append(suffix)
    parts.append("{{ end }}")
    if fmt.generation:
        parts.append(f'{{{{ if and $last (ne .Role "assistant") }}}}{_literal(fmt.generation)}{{{{ end }}}}')
    parts.append("{{ end }}")
    return "".join(parts)


def stop_words(fmt: ChatFormat) -> list[str]:
    """What ends an answer: the assistant turn's closing text and the next user turn's header."""
    words = []
    for text in (fmt.suffix["assistant"], fmt.prefix["user"]):
        word = text.strip()
        if word and word not in words and '"' not in word and len(word) <= 64:
            words.append(word)
    return words


def _quoted(text: str) -> str | None:
    return None if '"""' in text or text.endswith('"') else f'"""{text}"""'


def modelfile_text(gguf_name: str, model_name: str, fmt: ChatFormat | None, why: str, extra_stops: list[str]) -> str:
    """The Modelfile: FROM ./gguf_name, then TEMPLATE, SYSTEM and PARAMETER stop when the template was translated."""
    lines = [
        "# Ollama Modelfile written by `qlora-lite export --format gguf`.",
        f"# Create the model from this folder: ollama create {model_name} -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    template = go_template(fmt) if fmt is not None else None
    quoted = _quoted(template) if template is not None else None
    if fmt is not None and quoted is None:
        fmt, why = None, "it holds three double quotes in a row, which a Modelfile cannot quote"
    if fmt is None:
        lines += [
            f"# The chat template could not be translated to Ollama's template language: {why}.",
            "# The plain template below passes the prompt to the model as raw text; write a TEMPLATE by hand to chat.",
            f'TEMPLATE """{PLAIN_TEMPLATE}"""',
        ]
    else:
        lines += [f"# {note}." for note in fmt.notes]
        lines.append(f"TEMPLATE {quoted}")
        if fmt.default_system:
            system = _quoted(fmt.default_system)
            if system is None:
                lines.append("# The default system prompt holds quotes a Modelfile cannot hold; set it with SYSTEM.")
            else:
                lines.append(f"SYSTEM {system}")
    stops = (stop_words(fmt) if fmt is not None else []) + extra_stops
    for word in dict.fromkeys(w for w in stops if w and '"' not in w and "\n" not in w):
        lines.append(f'PARAMETER stop "{word}"')
    return "\n".join(lines) + "\n"


__all__ = ["ChatFormat", "infer_chat_format", "go_template", "modelfile_text", "stop_words", "PLAIN_TEMPLATE"]
