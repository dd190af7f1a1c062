"""Reading training records: JSONL files, JSON arrays or Hugging Face `datasets` names, and each record's format.

Records follow TRL's conventions, detected per record by `record_format`:
- `{"text": ...}`: loss on every token;
- `{"prompt": ..., "completion": ...}`: loss on the completion only;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation; loss on the assistant turns only.

Every record comes with its location ('file line N' or 'file[i]'), which error messages name. A JSONL line is
what ends at a newline ("\n", with an optional "\r"): Unicode line separators inside a JSON string stay in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import DataError

FORMATS = ("text", "prompt_completion", "messages")
# A \uD800-\uDFFF escape: JSON allows it, but alone (not as a pair) it decodes to no character at all.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse(text: str, where: str, one_line: bool) -> object:
    """`json.loads` with its failures as one `DataError` naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if not one_line:
            raise DataError(
                f"{where}: not valid JSON ({exc}); fix the file or write one JSON object per line (.jsonl)."
            ) from None
        problem = exc.msg[: -len(" at")] if exc.msg.endswith(" at") else exc.msg  # "Unterminated string starting at"
        raise DataError(
            f"{where} is not valid JSON ({problem} at column {exc.colno}); fix or remove that line."
        ) from None
    except RecursionError:
        raise DataError(
            f"{where} nests JSON arrays or objects too deeply to read (about a thousand levels or more); "
            'a record is a flat object such as {"text": ...}, so fix or remove it.'
        ) from None
    except ValueError as exc:  # an integer with more digits than Python converts: the reason precedes ": value has"
        raise DataError(f"{where} cannot be read as JSON ({str(exc).split(':')[0]}); fix or remove it.") from None


def _lone_surrogate(value: object) -> str | None:
    """A lone UTF-16 surrogate in a record's strings (keys included), as its \\uXXXX escape, or None.

    Iterative, so a record nested as deeply as the JSON reader allows is walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"\\u{ord(item[exc.start]):04x}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _check_text(record: object, where: str) -> None:
    """Refuse a record holding a lone surrogate escape: no tokenizer can encode it. Called only where the text
    holds such an escape (`SURROGATE_ESCAPE`), so the common case costs one regex scan."""
    bad = _lone_surrogate(record)
    if bad is not None:
        raise DataError(
            f"{where} holds the escape {bad}, half of a UTF-16 surrogate pair, which is no character on its own; "
            "write the character itself or its full pair, or remove that record."
        )


def _hub_dataset(name: str) -> list[tuple[str, dict]] | None:
    """Records of a Hugging Face `datasets` name ('org/name' or 'org/name:split'), or None if unavailable."""
    try:
        import datasets  # optional dependency
    except ImportError:
        return None
    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as exc:  # datasets raises many unrelated types (connection, file, value)
        raise DataError(
            f"the datasets library cannot load {name!r} ({str(exc).splitlines()[0][:160]}); check the name or use a local JSONL file."
        ) from None
    return [(f"{name}[{i}]", dict(row)) for i, row in enumerate(ds)]


def load_records(source: str | Path) -> list[tuple[str, dict]]:
    """(location, record) pairs from a .jsonl file, a .json array, or a Hugging Face datasets name.

    The location ('file:line' or 'file[index]') is what error messages name.
    """
    path = Path(source)
    if not path.exists():
        looks_like_file = path.suffix in (".jsonl", ".json") or str(source).startswith((".", "/"))
        records = None if looks_like_file else _hub_dataset(str(source))
        if records is not None:
            return records
        hint = "" if looks_like_file else " (a Hugging Face dataset name needs `pip install datasets`)"
        raise DataError(f"data file {source} does not exist{hint}; give the path of a JSONL file.")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give the path of a .jsonl or .json data file.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data file {path} cannot be read ({exc.strerror or exc}); check its permissions.") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is allowed and dropped
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line} is not UTF-8 text ({exc.reason} at byte {exc.start} of the file); save the file as UTF-8."
        ) from None
    if path.suffix == ".json" or (path.suffix != ".jsonl" and text.lstrip().startswith("[")):
        data = _parse(text, str(path), one_line=False)
        if not isinstance(data, list):
            raise DataError(
                f"{path} holds a JSON {type(data).__name__}, not an array of records; write a list of objects or JSONL."
            )
        records = [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
        if SURROGATE_ESCAPE.search(text) is not None:
            for where, rec in records:
                _check_text(rec, where)
    else:
        records = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            rec = _parse(line, where, one_line=True)
            if SURROGATE_ESCAPE.search(line) is not None:
                _check_text(rec, where)
            records.append((where, rec))
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(
                f'{where} is a JSON {type(rec).__name__}, not an object; each record must be an object such as {{"text": ...}}.'
            )
    if not records:
        raise DataError(f"{path} holds no records; add at least one JSON object.")
    return records


def record_format(record: dict, where: str) -> str:
    """'text', 'prompt_completion' or 'messages', or a `DataError` naming the missing or mistyped field."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'.")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn; add one.")
        return "messages"
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(
                    f"{where}: record has 'prompt' or 'completion' but no {key!r}; prompt/completion records need both."
                )
            if not isinstance(record[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}.")
        return "prompt_completion"
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}.")
        return "text"
    keys = ", ".join(sorted(record)) or "none"
    raise DataError(
        f"{where}: record has none of the fields 'text', 'prompt'+'completion' or 'messages' (it has: {keys}); "
        "use one of TRL's three formats."
    )
