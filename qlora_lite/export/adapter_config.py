"""The shape of `adapter_config.json`: every key qlora-lite reads, checked for its JSON type and range.

A wrong type is refused, never coerced ("8" as a string is not the number 8): one `AdapterError` naming the file,
the key, the value found and what belongs there. peft writes `null` for settings it leaves unset, so the optional
peft keys accept `null`; the "qlora_lite" record is written by qlora-lite alone and must be a whole object.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import AdapterError
from ..io.json_files import field_error, json_kind, read_json

QLORA_KEY = "qlora_lite"
FIX = "fix it or re-save the adapter with peft or qlora-lite"
RESAVE = "re-save the adapter with peft or qlora-lite"


def _wrong(where: str | Path, key: str, value: object, expected: str) -> AdapterError:
    return field_error(where, key, value, expected, AdapterError, FIX)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_rank(where: str | Path, key: str, value: object) -> None:
    if not _is_int(value) or value < 1:
        raise _wrong(where, key, value, "a positive whole number such as 8 or 16")


def _check_patterns(where: str | Path, key: str, value: object, rank: bool) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _wrong(where, key, value, "an object of module pattern -> value")
    for pattern, item in value.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise AdapterError(
                f"{where}: {key} key {pattern!r} is not a valid regular expression ({exc}); {FIX}."
            ) from None
        if rank:
            _check_rank(where, f"{key}[{pattern!r}]", item)
        elif not _is_number(item):
            raise _wrong(where, f"{key}[{pattern!r}]", item, "a finite number")


def check_quant_record(record: object, where: str | Path) -> None:
    """Refuse a "qlora_lite" record that is not an object or holds a key of the wrong type."""
    if not isinstance(record, dict):
        raise _wrong(where, QLORA_KEY, record, "an object (the quantization the adapter was trained against)")
    types = {
        "bits": (_is_int, "a whole number (4 or 8)"),
        "quant_type": (lambda v: isinstance(v, str), 'a string ("nf4" or "fp4")'),
        "double_quant": (lambda v: isinstance(v, bool), "true or false"),
        "blocksize": (_is_int, "a whole number such as 64"),
        "int8_threshold": (_is_number, "a finite number such as 6.0"),
        "vocab_size": (lambda v: _is_int(v) and v > 0, "a positive whole number (the resized embedding's rows)"),
    }
    for key, (ok, expected) in types.items():
        if key in record and not ok(record[key]):
            raise _wrong(where, f"{QLORA_KEY}.{key}", record[key], expected)
    modules = record.get("quantized_modules")
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise _wrong(where, f"{QLORA_KEY}.quantized_modules", modules, "a list of module paths")


def read_adapter_config_file(path: Path) -> dict:
    """`adapter_config.json` parsed and checked (`check_adapter_config`); every failure an `AdapterError`."""
    return check_adapter_config(read_json(path, AdapterError, RESAVE), path)


def check_adapter_config(config: object, where: str | Path) -> dict:
    """`config` (parsed from `where`) if every key qlora-lite reads has the right type and range; else one
    `AdapterError` naming the key."""
    if not isinstance(config, dict):
        raise AdapterError(
            f"{where} holds {json_kind(config)} where an adapter config must be a JSON object; {RESAVE}."
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{where} lacks {key!r}; {RESAVE}.")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise _wrong(where, "peft_type", peft_type, 'a string ("LORA")')
    if peft_type != "LORA":
        raise AdapterError(f"{where} describes a {peft_type} adapter; only LoRA adapters are supported.")
    _check_rank(where, "r", config["r"])
    if not _is_number(config["lora_alpha"]):
        raise _wrong(where, "lora_alpha", config["lora_alpha"], "a finite number such as 16")
    targets = config["target_modules"]
    if not (
        isinstance(targets, str)
        and targets
        or isinstance(targets, list)
        and targets
        and all(isinstance(t, str) and t for t in targets)
    ):
        raise _wrong(where, "target_modules", targets, 'a list of module names or a regex string such as "all-linear"')
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        raise _wrong(where, "lora_dropout", dropout, "a number in [0, 1)")
    for key in ("use_rslora", "use_dora"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise _wrong(where, key, config[key], "true or false")
    if not isinstance(config.get("bias", "none"), str):
        raise _wrong(where, "bias", config["bias"], 'a string ("none")')
    _check_patterns(where, "rank_pattern", config.get("rank_pattern"), rank=True)
    _check_patterns(where, "alpha_pattern", config.get("alpha_pattern"), rank=False)
    _check_token_indices(where, config.get("trainable_token_indices"))
    if QLORA_KEY in config:
        check_quant_record(config[QLORA_KEY], where)
    return config


def _check_token_indices(where: str | Path, value: object) -> None:
    """peft's `trainable_token_indices`: null, a list of token ids, or module name -> list of token ids."""
    if value is None:
        return
    lists = value.values() if isinstance(value, dict) else [value]
    ok = (isinstance(value, dict) and value or isinstance(value, list)) and all(
        isinstance(ids, list) and ids and all(_is_int(i) and i >= 0 for i in ids) for ids in lists
    )
    if not ok:
        raise _wrong(where, "trainable_token_indices", value, 'token ids, as a list or {"embed_tokens": [ids]}')


__all__ = ["read_adapter_config_file", "check_adapter_config", "check_quant_record", "QLORA_KEY"]
