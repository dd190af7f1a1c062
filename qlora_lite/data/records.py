"""Reading training records: JSONL files, JSON arrays or hub datasets by id, and each record's format.

A hub dataset (`Org/Name`, `Org/Name:split`) is a snapshot in the Hugging Face cache (`io.hub`, downloaded when
allowed); its split's JSON / JSONL files are read here like local ones, Parquet ones through pyarrow when it is
installed. The `datasets` library is not used: reading the files ourselves keeps the cache, offline mode, error
messages and record locations the same as for models and local files.

Records follow TRL's conventions, detected per record by `record_format`:
- `{"text": ...}`: loss on every token;
- `{"prompt": ..., "completion": ...}`: loss on the completion only;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation; loss on the assistant turns only.

Two more shapes are read natively and converted at read time (`convert_record`) into those, so they tokenize to
exactly the ids and masks of the equivalent record:
- alpaca `{"instruction", "input"?, "output", "system"?}`: the prompt is the instruction, then "\n\n" and the
  input when the input is not empty, then "\n\n"; the completion is the output. With a non-empty `system` it
  becomes `messages` instead: system, user (the prompt without the trailing "\n\n"), assistant (the output);
- ShareGPT `{"conversations": [{"from", "value"}, ...]}`: `messages`, with human/user -> user, gpt/assistant ->
  assistant, system and tool kept.
A source's `columns` mapping (`{question: prompt}`) renames fields before detection (`rename_columns`).

Every record comes with its location ('file line N' or 'file[i]'), which error messages name. A JSONL line is
what ends at a newline ("\n", with an optional "\r"): Unicode line separators inside a JSON string stay in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import DataError

FORMATS = ("text", "prompt_completion", "messages")
SOURCE_FORMATS = ("auto", *FORMATS, "alpaca", "sharegpt")  # what a source's `format` may name
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}
# A \uD800-\uDFFF escape: JSON allows it, but alone (not as a pair) it decodes to no character at all.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Hub datasets: the split names `datasets` recognises in file names, and what separates words in a file path.
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
SEPARATOR = r"[/\-._ 0-9]"
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
METADATA_FILES = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}


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


def _json_records(text: str, label: str, json_lines: bool) -> list[tuple[str, object]]:
    """(location, value) pairs of a JSON array (`json_lines` False) or of JSON Lines."""
    if not json_lines:
        data = _parse(text, label, one_line=False)
        if not isinstance(data, list):
            raise DataError(
                f"{label} holds a JSON {type(data).__name__}, not an array of records; write a list of objects or JSONL."
            )
        records: list[tuple[str, object]] = [(f"{label}[{i}]", rec) for i, rec in enumerate(data)]
        if SURROGATE_ESCAPE.search(text) is not None:
            for where, rec in records:
                _check_text(rec, where)
        return records
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{label} line {number}"
        rec = _parse(line, where, one_line=True)
        if SURROGATE_ESCAPE.search(line) is not None:
            _check_text(rec, where)
        records.append((where, rec))
    return records


def _read_file(path: Path, label: str, sniff: bool = False) -> list[tuple[str, dict]]:
    """The records of one JSON / JSONL file, each located as `label line N` or `label[i]`.

    A `.json` file is an array unless `sniff` is set (hub datasets often hold JSON Lines in `.json` files): then
    the content decides, as the `datasets` library does."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data file {label} cannot be read ({exc.strerror or exc}); check its permissions.") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is allowed and dropped
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{label} line {line} is not UTF-8 text ({exc.reason} at byte {exc.start} of the file); save the file as UTF-8."
        ) from None
    is_array = text.lstrip().startswith("[")
    if path.suffix == ".jsonl":
        json_lines = True
    elif path.suffix == ".json":
        json_lines = sniff and not is_array
    else:
        json_lines = not is_array
    records = _json_records(text, label, json_lines)
    _check_objects(records)
    return records  # type: ignore[return-value]


def _check_objects(records: list[tuple[str, object]]) -> None:
    """Refuse a record that is not a JSON object, naming where it is."""
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(
                f'{where} is a JSON {type(rec).__name__}, not an object; each record must be an object such as {{"text": ...}}.'
            )


def _named(stem: str, words: tuple[str, ...]) -> bool:
    """Whether a file path (without its extension) carries one of `words` as a whole word, as `datasets` reads it."""
    alternatives = "|".join(re.escape(w) for w in words)
    return re.search(rf"(?:^|{SEPARATOR})(?:{alternatives})(?:{SEPARATOR}|$)", stem) is not None


def hub_split_files(folder: Path, split: str, repo: str) -> list[str]:
    """The files of `split` in a hub dataset snapshot, as sorted paths relative to it.

    A file belongs to a split when its path names it as a word (`train.jsonl`, `data/train-00000-of-00002.jsonl`,
    `alpaca_train.json`, `train/part-1.jsonl`; `validation` also answers to valid/dev/val, `test` to eval). A
    dataset whose files name no split at all is one train split. JSON / JSONL files are read in preference to
    Parquet ones of the same split (repos holding both hold the same rows twice)."""
    files = sorted(
        rel.as_posix()
        for rel in (p.relative_to(folder) for p in folder.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if rel.name not in METADATA_FILES and not any(part.startswith(".") for part in rel.parts)
    )
    if not files:
        raise DataError(
            f"dataset {repo} has no JSON, JSONL or Parquet files ({folder}); qlora-lite reads only those, so convert "
            "it to JSONL and give the file's path."
        )
    stems = {f: f.rsplit(".", 1)[0] for f in files}
    chosen = [f for f in files if _named(stems[f], SPLIT_KEYWORDS.get(split, (split,)))]
    named = [name for name, words in SPLIT_KEYWORDS.items() if any(_named(stem, words) for stem in stems.values())]
    if not chosen and split == "train" and not named:
        chosen = files  # no split names at all: every file is the train split, as in `datasets`
    if not chosen:
        shown = ", ".join(files[:6]) + (", ..." if len(files) > 6 else "")
        hint = f"its file names carry the splits {', '.join(named)}" if named else f"its files are {shown}"
        raise DataError(f"dataset {repo} has no {split!r} split ({hint}); name one of its splits as {repo}:SPLIT.")
    text_files = [f for f in chosen if not f.endswith(".parquet")]
    return text_files or chosen


def _parquet_records(path: Path, label: str) -> list[tuple[str, dict]]:
    """The rows of a Parquet file as records; needs pyarrow (installed with the `datasets` extra)."""
    try:
        import pyarrow.parquet as pq  # optional: comes with `datasets`
    except ImportError:
        raise DataError(
            f"{label} is a Parquet file, which needs pyarrow; install the datasets extra "
            "(`pip install 'qlora-lite[datasets]'`) or convert the dataset to JSONL."
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{label} cannot be read as Parquet ({first[:160]}); download the dataset again or convert it to JSONL."
        ) from None
    records: list[tuple[str, object]] = [(f"{label}[{i}]", row) for i, row in enumerate(rows)]
    _check_objects(records)
    return records  # type: ignore[return-value]


def hub_dataset_name(source: str) -> tuple[str, str] | None:
    """(repo id, split) when `source` reads as a hub dataset (`Org/Name` or `Org/Name:split`), else None."""
    from ..io.hub import looks_like_hub_id

    repo, colon, split = source.partition(":")
    if not looks_like_hub_id(repo) or (colon and not SPLIT_NAME.fullmatch(split)):
        return None
    return repo, split or "train"


def _hub_records(repo: str, split: str) -> list[tuple[str, dict]]:
    """The records of one split of a hub dataset, read from its JSON / JSONL (or, with pyarrow, Parquet) files."""
    from ..io.hub import resolve_dataset_dir

    folder = resolve_dataset_dir(repo)
    files = hub_split_files(folder, split, repo)
    records: list[tuple[str, dict]] = []
    for rel in files:
        label = f"{repo}/{rel}"
        if rel.endswith(".parquet"):
            records.extend(_parquet_records(folder / rel, label))
        else:
            records.extend(_read_file(folder / rel, label, sniff=True))
    if not records:
        raise DataError(
            f"the {split} split of dataset {repo} holds no records ({', '.join(files)}); pick another split."
        )
    return records


def load_records(
    source: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None, key: str = "data.train"
) -> list[tuple[str, dict]]:
    """(location, record) pairs from a .jsonl file, a .json array, or a hub dataset id (`Org/Name[:split]`).

    A hub dataset resolves through the Hugging Face cache (`io.hub.resolve_dataset_dir`); its split's files are
    picked by name (`hub_split_files`). The location ('file line N' or 'file[index]') is what error messages name.
    Each record has its fields renamed by `columns` (the source `key` names it in errors), then alpaca and
    ShareGPT records are converted to TRL's shapes (`convert_record`; `fmt` other than "auto" insists on one).
    """
    return [
        (where, convert_record(rename_columns(record, columns, where, key) if columns else record, where, fmt))
        for where, record in _load_raw(source)
    ]


def _load_raw(source: str | Path) -> list[tuple[str, dict]]:
    """The records of a file or hub dataset as written."""
    path = Path(source)
    if not path.exists():
        looks_like_file = path.suffix in (".jsonl", ".json") or str(source).startswith((".", "/"))
        hub = None if looks_like_file else hub_dataset_name(str(source))
        if hub is not None:
            return _hub_records(*hub)
        other = "" if looks_like_file else " or a hub dataset id (Org/Name)"
        raise DataError(f"data file {source} does not exist; give the path of a JSONL file{other}.")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give the path of a .jsonl or .json data file.")
    records = _read_file(path, str(path))
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
    raise DataError(
        f"{where}: record has none of the fields 'text', 'prompt'+'completion' or 'messages' (it has: {_keys(record)}); "
        "use one of TRL's three formats."
    )


def _keys(record: dict) -> str:
    return ", ".join(sorted(map(str, record))) or "none"


def rename_columns(record: dict, columns: dict[str, str], where: str, key: str) -> dict:
    """`record` with each field named in `columns` renamed to its value; a missing field is a `DataError`."""
    for old in columns:
        if old not in record:
            raise DataError(
                f"{key}.columns maps {old!r}, but {where} has no field {old!r} (it has: {_keys(record)}); "
                f"fix {key}.columns or the record."
            )
    renamed = {k: v for k, v in record.items() if k not in columns}
    renamed.update({new: record[old] for old, new in columns.items()})
    return renamed


def native_format(record: dict) -> str | None:
    """The shape a record is written in: one of `FORMATS`, 'alpaca', 'sharegpt', or None."""
    if "messages" in record:
        return "messages"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    return None


def convert_record(record: dict, where: str, fmt: str = "auto") -> dict:
    """An alpaca or ShareGPT record as its `prompt`/`completion` or `messages` equivalent; TRL records unchanged.

    `fmt` "auto" detects the shape per record; another name (`SOURCE_FORMATS`) requires every record to be in it."""
    kind = native_format(record) if fmt == "auto" else fmt
    if kind == "alpaca":
        return _from_alpaca(record, where)
    if kind == "sharegpt":
        return _from_sharegpt(record, where)
    if fmt != "auto" and native_format(record) != fmt:
        raise DataError(
            f"{where} is not a {fmt} record (it has: {_keys(record)}) although its source sets format: {fmt}; "
            "fix the record or the source's format."
        )
    return record


def _from_alpaca(record: dict, where: str) -> dict:
    """An alpaca record as prompt/completion, or as messages when it has a non-empty `system`."""
    for name, required in (("instruction", True), ("output", True), ("input", False), ("system", False)):
        if name not in record and required:
            raise DataError(
                f"{where}: alpaca record has no {name!r} (it has: {_keys(record)}); alpaca records need "
                "'instruction' and 'output'."
            )
        if name in record and not isinstance(record[name], str | None):
            raise DataError(f"{where}: {name!r} must be a string, got {type(record[name]).__name__}.")
    if record["output"] is None or record["instruction"] is None:
        raise DataError(f"{where}: alpaca 'instruction' and 'output' must be strings, not null.")
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    if record.get("system"):
        turns = [("system", record["system"]), ("user", user), ("assistant", record["output"])]
        return {"messages": [{"role": role, "content": content} for role, content in turns]}
    return {"prompt": user + "\n\n", "completion": record["output"]}


def _from_sharegpt(record: dict, where: str) -> dict:
    """A ShareGPT record (`conversations` of {from, value}) as a messages record."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects.")
    messages = []
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise DataError(f"{where}: conversations[{i}] needs a string 'from' and a string 'value'.")
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            raise DataError(
                f"{where}: conversations[{i}] is from {turn['from']!r}, which is none of "
                f"{', '.join(SHAREGPT_ROLES)}; rename it in the data."
            )
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages}
