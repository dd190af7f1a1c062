"""Sizes written by people ('5GB', '12GiB', '500MB') as bytes: the one parser for shard sizes and memory budgets."""

from __future__ import annotations

import math
import re

from ..errors import ConfigError

# GB = 10^9 and GiB = 2^30, as transformers' max_shard_size and nvidia-smi use them.
SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
UNIT_NAMES = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
MAX_SIZE = 2**60  # an exbibyte: past any real budget or shard, and far inside what int64 file offsets take


def parse_size(value: str | int, what: str, example: str = "5GB") -> int:
    """Bytes from an int or a string such as '5GB', '500MB' or '2GiB'; `ConfigError` naming `what` otherwise.

    A size must come to at least one byte: '0.1B' or '0GB' is refused rather than rounded to nothing.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} {value!r} is not a size; write it like {example}.")
    if isinstance(value, int):
        if value > MAX_SIZE:
            raise ConfigError(f"{what} {value!r} is larger than any disk or GPU; write it like {example}.")
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if not match or match.group(2) not in SIZE_UNITS:
            raise ConfigError(
                f"{what} {value!r} is not a size; write a number with a unit ({UNIT_NAMES}), e.g. {example}."
            )
        number = float(match.group(1)) * SIZE_UNITS[match.group(2)]
        if not math.isfinite(number) or number > MAX_SIZE:
            raise ConfigError(f"{what} {value!r} is larger than any disk or GPU; write it like {example}.")
        size = int(number)
    if size <= 0:
        raise ConfigError(f"{what} {value!r} comes to {max(size, 0)} bytes; give a positive size such as {example}.")
    return size
