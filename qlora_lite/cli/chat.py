"""`qlora-lite chat`: an interactive conversation with a trained model, streamed token by token.

Lines typed on stdin are user turns; `/reset` starts the conversation over, `/exit` (or end of input) ends it.
The conversation is rendered with the chat template training used (the tokenizer's, or the fallback one).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .talk import add_model_arguments, load, sampling_from

HELP = "type a message; /reset starts over, /exit quits"


def add_parser(sub: Any) -> None:
    """Register `chat`."""
    p = sub.add_parser(
        "chat",
        help="talk to a trained model (base + adapter, or a merged dir)",
        description="An interactive chat with base + adapter (quantized as trained) or a merged model dir, "
        "streaming each answer. " + HELP + ".",
    )
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system prompt that opens the conversation")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """The chat loop over stdin lines."""
    from ..generate.prompts import chat_prompt_ids
    from ..generate.stream import generate_text

    sampling = sampling_from(args)
    loaded = load(args)
    interactive = sys.stdin.isatty()
    print(f"chatting with {loaded.description}; {HELP}", file=sys.stderr, flush=True)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = list(opening)
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        ids = chat_prompt_ids(loaded.tokenizer, messages)
        answer, _ = generate_text(
            loaded.model, loaded.tokenizer, ids, sampling, on_text=lambda piece: print(piece, end="", flush=True)
        )
        print(flush=True)
        messages.append({"role": "assistant", "content": answer})
