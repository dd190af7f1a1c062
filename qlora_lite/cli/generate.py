"""`qlora-lite generate`: answers to prompts from arguments or a JSONL file, one JSON line each, for scripts.

A JSONL record is `{"prompt": ...}` (plain text, as prompt/completion records train) or `{"messages": [...]}`
(rendered with the chat template); `--prompt TEXT` gives plain prompts, with `--chat` as user turns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .talk import add_model_arguments, load, sampling_from


def add_parser(sub: Any) -> None:
    """Register `generate`."""
    p = sub.add_parser(
        "generate",
        help="answer prompts from arguments or a JSONL file (JSON lines out)",
        description="Answer prompts with base + adapter or a merged model dir and write one JSON line per "
        'prompt ({"prompt"|"messages", "completion"}) to stdout or --output.',
    )
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--input", default=None, help='JSONL file of {"prompt": ...} or {"messages": [...]} records')
    p.add_argument("--chat", action="store_true", help="render --prompt texts as user turns with the chat template")
    p.add_argument("--system", default=None, help="system prompt for chat-rendered prompts")
    p.add_argument("--output", default=None, help="write the JSON lines here (atomically) instead of stdout")
    p.set_defaults(handler=run)


def _records(args: argparse.Namespace) -> list[dict]:
    from ..data.records import load_records
    from ..errors import DataError, UsageError

    records: list[dict] = []
    for text in args.prompt:
        if args.chat:
            opening = [{"role": "system", "content": args.system}] if args.system else []
            records.append({"messages": [*opening, {"role": "user", "content": text}]})
        else:
            records.append({"prompt": text})
    if args.input:
        for _, record in load_records(args.input):
            if isinstance(record.get("messages"), list):
                turns = list(record["messages"])
                while turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
                    turns.pop()  # answer the conversation up to its last user turn
                records.append({"messages": turns})
            elif isinstance(record.get("prompt"), str):
                records.append({"prompt": record["prompt"]})
            else:
                raise DataError(
                    f"{args.input}: a record for generate needs 'prompt' or 'messages', got {sorted(record)}."
                )
    if not records:
        raise UsageError("generate needs --prompt TEXT or --input FILE.jsonl.")
    return records


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """Answer every prompt, writing one JSON line each."""
    from ..generate.prompts import chat_prompt_ids, text_prompt_ids
    from ..generate.stream import generate_text

    sampling = sampling_from(args)
    records = _records(args)
    loaded = load(args)
    lines = []
    for record in records:
        if "messages" in record:
            ids = chat_prompt_ids(loaded.tokenizer, record["messages"])
        else:
            ids = text_prompt_ids(loaded.tokenizer, record["prompt"])
        text, new_ids = generate_text(loaded.model, loaded.tokenizer, ids, sampling)
        line = json.dumps({**record, "completion": text, "tokens": new_ids}, ensure_ascii=False)
        if args.output is None:
            print(line, flush=True)
        lines.append(line)
    if args.output is not None:
        from ..io.atomic import write_text_atomic

        write_text_atomic(Path(args.output), "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} answers to {args.output}", file=sys.stderr)
    return 0
