"""Several data sources: `data.train` / `data.eval` as a list, each source checked, read and (train) mixed.

A source is a path or hub id, or a mapping `{path, weight, format, columns}`:
- `format`: auto (detect per record) or one of text, prompt_completion, messages, alpaca, sharegpt;
- `columns`: `{field_in_data: field_qlora_lite_reads}`, renamed before the format is detected;
- `weight` (> 0): the source's share of the training mixture.

Without any weight the sources are concatenated in order, as one file would be. With weights (a source without
one counts as weight 1) an epoch is a mixture drawn from the run's seed (`mixture_counts`, `draw_mixture`): with
N = (size of the largest source) / (its share w / sum of weights), source i supplies round(N * w_i / sum w)
sequences (at least one), so the largest source is seen exactly once per epoch. A source drawn more often than
it has sequences is repeated whole as many times as fit, the rest drawn without replacement; one drawn less
often is sampled without replacement. The drawn sequences are then shuffled together, so packing and the batch
order see them interleaved. Counts are exact (not random), only which records and their order depend on the
seed. Eval sources are always read once each, in order (weights shape the training mixture only).
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .records import SOURCE_FORMATS, load_records

SOURCE_KEYS = ("path", "weight", "format", "columns")


@dataclass(frozen=True)
class Source:
    """One data source as configured: `key` is how messages name it (`data.train[1]`)."""

    key: str
    path: str
    weight: float | None = None
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)


def _closest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _source(item: Any, key: str) -> Source:
    """One list entry checked: a non-empty path string, or a mapping of `SOURCE_KEYS`."""
    if isinstance(item, str):
        if not item.strip():
            raise ConfigError(f"{key} is an empty string; give the path of a JSONL file or a hub dataset id.")
        return Source(key, item)
    if not isinstance(item, dict):
        raise ConfigError(
            f"{key} is {item!r}; a source is a path or a mapping {{path: ..., weight: ..., format: ..., columns: ...}}."
        )
    for name in item:
        if name not in SOURCE_KEYS:
            raise ConfigError(
                f"{key} has the unknown key {name!r}{_closest(str(name), SOURCE_KEYS)}; "
                f"a source's keys are {', '.join(SOURCE_KEYS)}."
            )
    path = item.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{key}.path is {path!r}; give each source the path of a JSONL file or a hub dataset id.")
    weight = item.get("weight")
    if weight is not None:
        ok = isinstance(weight, int | float) and not isinstance(weight, bool) and math.isfinite(weight)
        if not ok or weight <= 0:
            raise ConfigError(f"{key}.weight is {weight!r}; a weight is a number > 0 (the source's share of the mix).")
        weight = float(weight)
    fmt = item.get("format", "auto")
    if fmt not in SOURCE_FORMATS:
        raise ConfigError(
            f"{key}.format is {fmt!r}{_closest(str(fmt), SOURCE_FORMATS)}; use one of {', '.join(SOURCE_FORMATS)}."
        )
    columns = item.get("columns") or {}
    if not isinstance(columns, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in columns.items()
    ):
        raise ConfigError(
            f"{key}.columns is {columns!r}; write it as a mapping of field names such as {{question: prompt}}."
        )
    return Source(key, path, weight, fmt, dict(columns))


def parse_sources(value: str | list, role: str = "train") -> list[Source]:
    """The sources of `data.<role>` (a path, or a list of paths and mappings), each checked; a `ConfigError`
    names the entry (`data.train[1].weight`) and the fix."""
    key = f"data.{role}"
    if isinstance(value, str):
        return [_source(value, key)]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} is {value!r}; give a path, a hub dataset id, or a non-empty list of sources.")
    return [_source(item, f"{key}[{i}]") for i, item in enumerate(value)]


def read_source(source: Source) -> list[tuple[str, dict]]:
    """The (location, record) pairs of one source, columns renamed and formats converted (`records.load_records`)."""
    return load_records(source.path, source.format, source.columns, source.key)


def weighted(sources: list[Source]) -> bool:
    """Whether the sources form a weighted mixture (some source has a weight and there are several)."""
    return len(sources) > 1 and any(s.weight is not None for s in sources)


def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """How many sequences each source supplies to one epoch (see the module docstring for the rule)."""
    total = sum(weights)
    largest = max(range(len(sizes)), key=lambda i: sizes[i])
    epoch = sizes[largest] * total / weights[largest]
    return [max(1, math.floor(epoch * w / total + 0.5)) for w in weights]


def draw_mixture(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(source index, item index) pairs of one mixed epoch, drawn deterministically from `seed`."""
    rng = random.Random(seed)
    picks: list[tuple[int, int]] = []
    for i, (size, count) in enumerate(zip(sizes, mixture_counts(sizes, weights))):
        whole, rest = divmod(count, size)
        picks.extend((i, j) for _ in range(whole) for j in range(size))
        picks.extend((i, j) for j in rng.sample(range(size), rest))
    rng.shuffle(picks)
    return picks
