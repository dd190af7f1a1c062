"""`qlora-lite data CONFIG.yaml [--records N | --index I ...] [--json] [--section.key value ...]`: the training
data as the run will see it, without loading the model: the text of some sequences with the loss-carrying tokens
marked, the counts, and the length distribution."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from typing import Any

from .common import console

OPEN, CLOSE = "[[", "]]"


def add_parser(sub: Any) -> None:
    """Register `data` and its flags (every config key also as --section.key, as for `train`)."""
    p = sub.add_parser(
        "data",
        help="show the training data as tokenized, with the loss-carrying tokens marked",
        description=(
            "Tokenize the training data as `train` would (chat template, truncation, packing; the model's weights are "
            f"not loaded) and show sequences with the loss-carrying tokens marked ({OPEN}...{CLOSE} when not on a "
            "terminal), the counts and the length distribution. Config keys can be overridden as --section.key value."
        ),
    )
    p.add_argument("config", help="YAML training config")
    p.add_argument("--records", type=int, default=3, metavar="N", help="show the first N sequences (default 3)")
    p.add_argument(
        "--index",
        type=int,
        action="append",
        metavar="I",
        help="show sequence I (0-based; a record, or a pack of records with data.packing); repeatable",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (the same data) for scripts")
    p.set_defaults(handler=run, accepts_overrides=True)


def loss_segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The sequence's text as (piece, carries loss) runs of consecutive tokens. Position 0 never carries loss (no
    token precedes it), matching the loss's shift."""
    flags = [j > 0 and lab != -100 for j, lab in enumerate(labels)]
    segments: list[tuple[str, bool]] = []
    start = 0
    for j in range(1, len(input_ids) + 1):
        if j == len(input_ids) or flags[j] != flags[start]:
            text = tokenizer.decode(input_ids[start:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            segments.append((text, flags[start]))
            start = j
    return segments


def bracketed(segments: list[tuple[str, bool]]) -> str:
    """Plain rendering: loss-carrying runs inside `[[` `]]`."""
    return "".join(f"{OPEN}{text}{CLOSE}" if loss else text for text, loss in segments)


def length_summary(lengths: list[int]) -> dict[str, float]:
    """min / median / p95 (nearest rank) / max of the sequence lengths in tokens."""
    ordered = sorted(lengths)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {"min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


def _chosen(args: argparse.Namespace, n: int) -> list[int]:
    from ..errors import UsageError

    if args.index:
        bad = [i for i in args.index if not 0 <= i < n]
        if bad:
            raise UsageError(f"--index {bad[0]} is out of range; the data has {n} sequences (0 to {n - 1}).")
        return list(args.index)
    if args.records < 0:
        raise UsageError(f"--records is {args.records}; give a count of 0 or more.")
    return list(range(min(args.records, n)))


def describe(config, pick: Callable[[int], list[int]] = lambda n: list(range(min(3, n)))) -> dict:
    """The report as a dict: counts, length distribution and the sequences `pick(number of sequences)` chooses."""
    from ..training.setup import prepare_tokenizer_and_data

    prepared = prepare_tokenizer_and_data(config)
    ds, tokenizer = prepared.train_data, prepared.tokenizer
    st = ds.stats
    shown = []
    for i in pick(len(ds)):
        ex = ds.examples[i]
        segments = loss_segments(tokenizer, ex.input_ids, ex.labels)
        shown.append(
            {
                "index": i,
                "source": ex.source,
                "tokens": len(ex),
                "loss_tokens": sum(1 for lab in ex.labels[1:] if lab != -100),
                "marked": bracketed(segments),
                "segments": [{"text": text, "loss": loss} for text, loss in segments],
            }
        )
    return {
        "counts": {
            "records": st.records,
            "sequences": st.sequences,
            "tokens": st.tokens,
            "loss_tokens": st.target_tokens,
            "truncated": st.truncated,
            "dropped_no_target": st.dropped_no_target,
            "packed": st.packed,
        },
        "sources": [
            {
                "name": s.name,
                "path": s.path,
                "records": s.records,
                "sequences": s.sequences,
                "tokens": s.tokens,
                "loss_tokens": s.target_tokens,
            }
            for s in st.sources
        ],  # fmt: skip
        "lengths": length_summary([len(e) for e in ds.examples]),
        "sequences": shown,
    }


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """Print the data report: rich text on a terminal, brackets otherwise, or one JSON object with --json."""
    from rich.text import Text

    from ..config.load import load_config

    config = load_config(args.config, overrides)
    out = console()
    report = describe(config, lambda n: _chosen(args, n))
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    for item in report["sequences"]:
        out.print(Text(f"sequence {item['index']} ({item['source']}): {item['tokens']} tokens, "
                       f"{item['loss_tokens']} with loss", style="bold"), soft_wrap=True)  # fmt: skip
        if out.is_terminal:
            out.print(Text.assemble(*[(s["text"], "bold green" if s["loss"] else "dim") for s in item["segments"]]))
        else:
            out.print(Text(item["marked"]), soft_wrap=True)
        out.print()
    c, lens = report["counts"], report["lengths"]
    out.print(Text(
        f"{c['records']} records -> {c['sequences']} sequences{' (packed)' if c['packed'] else ''}: {c['tokens']} "
        f"tokens, {c['loss_tokens']} with loss; {c['truncated']} truncated, {c['dropped_no_target']} dropped "
        "without a target"
    ), soft_wrap=True)  # fmt: skip
    for s in report["sources"]:  # only when data.train lists several sources
        out.print(Text(f"  {s['name']} ({s['path']}): {s['records']} records -> {s['sequences']} sequences, "
                       f"{s['tokens']} tokens, {s['loss_tokens']} with loss"), soft_wrap=True)  # fmt: skip
    out.print(Text(f"tokens per sequence: min {lens['min']}, median {lens['median']:g}, p95 {lens['p95']}, "
                   f"max {lens['max']}"), soft_wrap=True)  # fmt: skip
    return 0
