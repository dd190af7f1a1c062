"""Reading JSON files of an expected shape, with one-sentence errors that name the file, the key and the fix.

`read_json_object` reads a file that must hold a JSON object; the `expect_*` helpers check one field of it.
Every failure is raised as the caller's `QloraLiteError` subclass (`ModelLoadError` by default), so each
area keeps its own error type and exit code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, QloraLiteError

DEFAULT_FIX = "fix or re-download it"


def json_kind(value: Any) -> str:
    """The JSON kind of a parsed value, with its article: "a string", "a list", "an object", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def shown(value: Any, limit: int = 40) -> str:
    """A short JSON rendering of a value for a message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) <= limit:
        return text
    close = {list: "]", dict: "}"}.get(type(value), "")
    return text[: limit - 3 - len(close)].rstrip() + "..." + close


def read_json(path: str | Path, error: type[QloraLiteError] = ModelLoadError, fix: str = DEFAULT_FIX) -> Any:
    """The parsed content of a JSON file; unreadable, non-UTF-8 or malformed files raise `error`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc}); check the file and its permissions.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); {fix}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); {fix}.") from None
    except ValueError as exc:  # e.g. an integer literal too long to convert
        raise error(f"{path} is not valid JSON ({exc}); {fix}.") from None


def read_json_object(
    path: str | Path, what: str, error: type[QloraLiteError] = ModelLoadError, fix: str = DEFAULT_FIX
) -> dict:
    """A JSON file that must hold an object (`what` names it in the message, e.g. "a model config")."""
    data = read_json(path, error, fix)
    if not isinstance(data, dict):
        raise error(f"{path} holds {json_kind(data)} where {what} must be a JSON object; {fix}.")
    return data


def field_error(
    where: str | Path,
    key: str,
    value: Any,
    expected: str,
    error: type[QloraLiteError] = ModelLoadError,
    fix: str = DEFAULT_FIX,
) -> QloraLiteError:
    """The one-sentence error for a field that holds the wrong thing (to raise)."""
    return error(f'{where}: "{key}" is {shown(value)} ({json_kind(value)}) but must be {expected}; {fix}.')


def expect_object(
    data: dict,
    key: str,
    where: str | Path,
    *,
    required: bool = False,
    error: type[QloraLiteError] = ModelLoadError,
    fix: str = DEFAULT_FIX,
) -> dict | None:
    """`data[key]` when it is an object; None when absent or null and not required."""
    return _expect(data, key, where, dict, "a JSON object", required, error, fix)


def expect_str(
    data: dict,
    key: str,
    where: str | Path,
    *,
    required: bool = False,
    error: type[QloraLiteError] = ModelLoadError,
    fix: str = DEFAULT_FIX,
) -> str | None:
    """`data[key]` when it is a string; None when absent or null and not required."""
    return _expect(data, key, where, str, "a string", required, error, fix)


def expect_int(
    data: dict,
    key: str,
    where: str | Path,
    *,
    minimum: int | None = None,
    required: bool = False,
    error: type[QloraLiteError] = ModelLoadError,
    fix: str = DEFAULT_FIX,
) -> int | None:
    """`data[key]` when it is a whole number (not true/false) of at least `minimum`; None when absent or null."""
    expected = "a whole number" if minimum is None else f"a whole number of at least {minimum}"
    value = data.get(key)
    if value is None:
        if required:
            raise error(f'{where} has no "{key}" ({expected} is needed); {fix}.')
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise field_error(where, key, value, expected, error, fix)
    return value


def _expect(
    data: dict,
    key: str,
    where: str | Path,
    kind: type,
    expected: str,
    required: bool,
    error: type[QloraLiteError],
    fix: str,
) -> Any:
    value = data.get(key)
    if value is None:
        if required:
            raise error(f'{where} has no "{key}" ({expected} is needed); {fix}.')
        return None
    if not isinstance(value, kind):
        raise field_error(where, key, value, expected, error, fix)
    return value
