"""Tokenizing records with loss masks, truncating, dropping target-less ones, packing: records -> `TokenizedDataset`.

Labels by format (see `records.py`): `text` trains on every token (EOS appended); `prompt_completion` on the
completion and the EOS appended to it; `messages` on the assistant turns, rendered through the chat template
(`chat.py`), with `data.system_prompt` as a first system turn where a record has none (no loss on it).

Masks are computed on characters and mapped to tokens through the tokenizer's offset mapping, so the
tokens trained on are exactly the tokens the model sees when the same text is tokenized whole (no
boundary artefacts from tokenizing pieces separately); a token is trained on when it holds any target
character. Labels are aligned with `input_ids`
(`labels[j]` is the target for position j; -100 means no loss); the loss shifts them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.settings import DataConfig
from ..errors import DataError
from .batching import IGNORE_INDEX
from .chat import render_chat, with_system_turn
from .mix import Source, draw_mixture, parse_sources, read_source, weighted
from .records import record_format


@dataclass
class Example:
    """One tokenized training sequence: token ids, aligned labels (-100 = no loss) and where it came from.

    A packed sequence also carries `position_ids` restarting at 0 for each record in it; the forward turns them
    into block-diagonal attention, so packed records never see each other. None: positions 0..n-1, one record.
    """

    input_ids: list[int]
    labels: list[int]
    source: str
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SourceStats:
    """One source's part of a dataset: records read; sequences, tokens and loss-carrying tokens it put in an
    epoch (counted before packing; with weights, drawn sequences, repeats included)."""

    name: str
    path: str = ""
    records: int = 0
    sequences: int = 0
    tokens: int = 0
    target_tokens: int = 0


@dataclass
class DatasetStats:
    """What preparation did to the records, for the progress header and the summary; `sources` holds one entry
    per data source when there are several."""

    records: int = 0
    sequences: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    packed: bool = False
    sources: list[SourceStats] = field(default_factory=list)


@dataclass
class TokenizedDataset:
    """Tokenized sequences ready for batching, with their statistics."""

    examples: list[Example]
    stats: DatasetStats

    def __len__(self) -> int:
        return len(self.examples)


def _tokenize_with_mask(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool, where: str):
    """Token ids of `text` and labels that keep exactly the tokens holding a character of one of the char spans.

    A token that straddles a span boundary (e.g. 'Ġ4' from prompt 'Q: ' + completion '4') is trained on:
    it carries target text, and masking it would drop the answer's first token.
    """
    try:
        enc = tokenizer(
            text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, return_attention_mask=False
        )
    except NotImplementedError:
        raise DataError(
            f"{where}: the tokenizer is not a fast tokenizer, so loss masks cannot be placed; use a model with tokenizer.json."
        ) from None
    ids = list(enc["input_ids"])
    labels = []
    for tok, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = end > start and any(start < b and end > a for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return ids, labels


def _append_eos(tokenizer, ids: list[int], labels: list[int], train_on_it: bool) -> None:
    """Append the tokenizer's EOS unless the ids already end with it; trained on when `train_on_it`."""
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos if train_on_it else IGNORE_INDEX)


def encode_record(record: dict, tokenizer, fmt: str, where: str, system_prompt: str = "") -> Example:
    """Tokenize one record (no truncation) with the labels of its format; a `messages` record without a system turn
    gets one holding `system_prompt` first (when not empty)."""
    if fmt == "text":
        ids, labels = _tokenize_with_mask(tokenizer, record["text"], [(0, len(record["text"]))], True, where)
        _append_eos(tokenizer, ids, labels, True)
        return Example(ids, labels, where)
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        text = prompt + completion
        ids, labels = _tokenize_with_mask(tokenizer, text, [(len(prompt), len(text))], True, where)
        _append_eos(tokenizer, ids, labels, True)
        return Example(ids, labels, where)
    messages = with_system_turn(
        [{"role": m["role"], "content": m["content"]} for m in record["messages"]], system_prompt
    )
    try:
        full = render_chat(tokenizer, messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
            after = render_chat(tokenizer, messages[: i + 1])
            if not (full.startswith(before) and full.startswith(after) and len(after) >= len(before)):
                raise DataError(
                    f"{where}: the chat template does not render this conversation turn by turn (a prefix of the "
                    "conversation renders differently inside the whole), so assistant tokens cannot be located; "
                    "convert the records to prompt/completion."
                )
            spans.append((len(before), len(after)))
    except DataError:
        raise
    except Exception as exc:  # jinja raises its own types (TemplateError, exceptions raised by the template)
        raise DataError(
            f"{where}: the chat template cannot render this conversation ({str(exc).splitlines()[0][:160]})."
        ) from None
    ids, labels = _tokenize_with_mask(tokenizer, full, spans, False, where)
    return Example(ids, labels, where)


def _pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Greedy packing in order: whole examples are concatenated until the next would not fit.

    Each pack carries `position_ids` that restart at 0 for every record, from which the forward builds
    block-diagonal causal attention (`training.loss.packed_attention`): a packed record sees only itself, so its
    logits equal those of the record run alone. The first label of every example after the first in a pack is
    dropped, so no loss is taken for predicting one record's first token from the previous record (run alone,
    that label is never a target either).
    """
    packs: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    sources: list[str] = []
    for ex in examples:
        if ids and len(ids) + len(ex) > max_seq_len:
            packs.append(Example(ids, labels, "; ".join(sources), positions))
            ids, labels, positions, sources = [], [], [], []
        ex_labels = list(ex.labels)
        if ids:
            ex_labels[0] = IGNORE_INDEX
        ids = ids + list(ex.input_ids)
        labels = labels + ex_labels
        positions = positions + list(range(len(ex)))
        sources.append(ex.source)
    if ids:
        packs.append(Example(ids, labels, "; ".join(sources), positions))
    return packs


def build_dataset(
    records: Iterable[tuple[str, dict]],
    tokenizer,
    max_seq_len: int,
    truncation: bool = True,
    packing: bool = False,
    system_prompt: str = "",
) -> TokenizedDataset:
    """Tokenize records, truncate (or refuse) long ones, drop ones left without a target, optionally pack;
    `system_prompt` opens `messages` records that have no system turn."""
    stats = DatasetStats(packed=packing)
    examples: list[Example] = []
    for where, record in records:
        stats.records += 1
        fmt = record_format(record, where)
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        ex = encode_record(record, tokenizer, fmt, where, system_prompt)
        if len(ex) > max_seq_len:
            if not truncation:
                raise DataError(
                    f"{where}: the record is {len(ex)} tokens long, more than data.max_seq_len={max_seq_len}; "
                    "raise data.max_seq_len, shorten the record, or set data.truncation: true."
                )
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len], where)
            stats.truncated += 1
        # labels[0] is never a target (nothing precedes it), so a record needs a target after position 0.
        if all(lab == IGNORE_INDEX for lab in ex.labels[1:]):
            stats.dropped_no_target += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(
            f"no usable records ({stats.records} read, {stats.dropped_no_target} without any target token left after "
            f"truncation to {max_seq_len} tokens); add data or raise data.max_seq_len."
        )
    if packing:
        examples = _pack(examples, max_seq_len)
    stats.sequences = len(examples)
    stats.tokens = sum(len(e) for e in examples)
    stats.target_tokens = sum(sum(1 for lab in e.labels[1:] if lab != IGNORE_INDEX) for e in examples)
    return TokenizedDataset(examples, stats)


def split_records(records: list[tuple[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) with round(fraction * n) records (at least one) held out, chosen by a seeded shuffle."""
    n = len(records)
    n_eval = max(1, int(round(n * fraction)))
    if n_eval >= n:
        raise DataError(f"data.eval_fraction={fraction} leaves no training records out of {n}; lower it or add data.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    return train, evals


def _targets(example: Example) -> int:
    return sum(1 for lab in example.labels[1:] if lab != IGNORE_INDEX)


def _from_sources(groups: list[list], sources: list[Source], config: DataConfig, tokenizer, seed: int, packing: bool):
    """One dataset from several sources' records: each tokenized alone, then mixed by weight (`mix.draw_mixture`)
    or concatenated, then packed; `stats.sources` holds each source's part."""
    parts = []
    for source, records in zip(sources, groups):
        try:
            parts.append(
                build_dataset(records, tokenizer, config.max_seq_len, config.truncation, False, config.system_prompt)
            )
        except DataError as exc:
            if not str(exc).startswith("no usable records"):
                raise
            raise DataError(f"{source.key} ({source.path}) has {exc}") from None
    sizes = [len(p) for p in parts]
    if weighted(sources):
        picks = draw_mixture(sizes, [1.0 if s.weight is None else s.weight for s in sources], seed)
    else:
        picks = [(i, j) for i, size in enumerate(sizes) for j in range(size)]
    stats = DatasetStats(packed=packing)
    stats.sources = [SourceStats(s.key, s.path, p.stats.records) for s, p in zip(sources, parts)]
    examples = []
    for i, j in picks:
        ex = parts[i].examples[j]
        examples.append(ex)
        part = stats.sources[i]
        part.sequences, part.tokens, part.target_tokens = (
            part.sequences + 1,
            part.tokens + len(ex),
            part.target_tokens + _targets(ex),
        )
    for p in parts:
        stats.records += p.stats.records
        stats.truncated += p.stats.truncated
        stats.dropped_no_target += p.stats.dropped_no_target
        for fmt, n in p.stats.formats.items():
            stats.formats[fmt] = stats.formats.get(fmt, 0) + n
    if packing:
        examples = _pack(examples, config.max_seq_len)
    stats.sequences = len(examples)
    stats.tokens = sum(len(e) for e in examples)
    stats.target_tokens = sum(_targets(e) for e in examples)
    return TokenizedDataset(examples, stats)


def prepare_data(config: DataConfig, tokenizer, seed: int = 0) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Train and (optional) eval datasets from the data settings: one source or several (`data/mix.py`: weighted
    training mixtures drawn from `seed`), or a split of the training data (`eval_fraction`, per source)."""
    sources = parse_sources(config.train, "train")
    groups = [read_source(s) for s in sources]
    eval_sources: list[Source] = []
    eval_groups = None
    if config.eval:
        eval_sources = parse_sources(config.eval, "eval")
        eval_groups = [read_source(s) for s in eval_sources]
    elif config.eval_fraction > 0:
        eval_sources = sources
        pairs = [split_records(g, config.eval_fraction, seed) for g in groups]
        groups, eval_groups = [t for t, _ in pairs], [e for _, e in pairs]
    if len(sources) == 1:
        train = build_dataset(
            groups[0], tokenizer, config.max_seq_len, config.truncation, config.packing, config.system_prompt
        )
    else:
        train = _from_sources(groups, sources, config, tokenizer, seed, config.packing)
    evals = None
    if eval_groups is not None:
        if len(eval_sources) == 1:
            evals = build_dataset(
                eval_groups[0], tokenizer, config.max_seq_len, config.truncation, False, config.system_prompt
            )
        else:
            unweighted = [Source(s.key, s.path, None, s.format, s.columns) for s in eval_sources]
            evals = _from_sources(eval_groups, unweighted, config, tokenizer, seed, False)
    return train, evals
