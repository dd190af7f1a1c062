"""`qlora-lite demo`: the offline quick start, rendered (the run itself is `qlora_lite.demo.run`)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import console as make_console


def add_parser(sub: Any) -> None:
    """Register `demo` and its flags."""
    p = sub.add_parser(
        "demo",
        help="offline quick start: a tiny model learns a task with 4-bit QLoRA (seconds on a CPU)",
        description="Take the shipped tiny model (pre-trained to copy words) and teach it a Caesar shift with 4-bit QLoRA; "
        "shows eval loss, accuracy and generations before and after. Runs offline.",
    )
    p.add_argument(
        "--out", default="runs/demo", help="where the demo writes its base model, data, run and merged model"
    )
    p.add_argument("--steps", type=int, default=80, help="QLoRA training steps")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """Run the demo and print its before/after tables."""
    from rich.table import Table

    from ..demo.run import run_demo
    from ..training.progress import RichReporter, summary_table

    console = make_console()
    reporter = RichReporter(console, title="QLoRA")
    try:
        demo = run_demo(
            args.out, reporter=reporter, on_stage=lambda msg: console.print(f"[bold]>[/] {msg}"), train_steps=args.steps
        )
    finally:
        reporter.close()
    console.print(summary_table(demo.train, title="QLoRA run"))
    table = Table(title="the shift task (each letter one on), before and after QLoRA")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("eval loss", f"{demo.eval_loss_before:.4f}", f"{demo.eval_loss_after:.4f}")
    table.add_row("exact answers (64 unseen words)", f"{demo.accuracy_before:.0%}", f"{demo.accuracy_after:.0%}")
    console.print(table)
    samples = Table(title="greedy generations")
    for column in ("prompt", "expected", "before", "after") + (("merged fp16",) if demo.merged_dir else ()):
        samples.add_column(column)
    for s in demo.samples:
        ok = "green" if s.after == s.expected else "red"
        shown = [a if a else "[dim](nothing)[/]" for a in (s.before, s.after, s.merged or "")]
        row = [s.prompt, s.expected, shown[0], f"[{ok}]{shown[1]}[/]"] + ([shown[2]] if demo.merged_dir else [])
        samples.add_row(*row)
    console.print(samples)
    if demo.merged_dir:
        console.print(f"merged fp16 model: {demo.merged_dir} (loads with AutoModelForCausalLM.from_pretrained)")
    elif demo.merge_note:
        console.print(f"[dim]{demo.merge_note}[/]")
    console.print(f"done in {demo.seconds:.0f} s; base model, data and run are in {demo.out_dir}")
    return 0
