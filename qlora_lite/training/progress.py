"""Rich rendering of training progress, for the command line (`train`, `demo`) and for `train()` from Python.

`RichReporter` turns a run's `Reporter` events into a progress bar (step, loss, learning rate, tokens/s, memory
on CUDA) on a terminal or in a notebook, or, when the output is a file or a pipe (a batch job's log), into one
plain line per metrics.jsonl row (`Reporter.on_log`: every `train.log_every` steps and the last, with the
window's mean loss and tokens/s); plus one line per eval and checkpoint. `summary_table` renders the end of a
run. `display_for_python` is what `train(config)` shows when no reporter is given.

It lives in `training/` (not `cli/`) so that `train()` can show it; it prints only to the console it is given.
"""

from __future__ import annotations

from typing import Any

from .reporter import Reporter, TrainResult


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def _start_line(info: dict) -> str:
    """The run's length: "2.0 epochs = 25 steps of 16 sequences", or "25 steps of 16 sequences (2.0 epochs)"."""
    steps, per_step = info["max_steps"], info.get("sequences_per_step")
    per_epoch = info.get("micro_batches_per_epoch")
    length = f"{steps} step{'s' if steps != 1 else ''}" + (f" of {per_step} sequences" if per_step else "")
    if info.get("epochs"):
        return f"{float(info['epochs'])!r} epochs = {length}"
    if per_epoch and info.get("grad_accum"):
        return f"{length} ({steps * info['grad_accum'] / per_epoch:.3g} epochs)"
    return length


class RichReporter(Reporter):
    """A rich progress bar and event lines on `console` (a `rich.console.Console`)."""

    def __init__(self, console: Any, title: str = "training"):
        self.console = console
        self.title = title
        self.progress = None
        self.task = None
        self.live = console.is_terminal or console.is_jupyter  # a redrawn bar; plain lines otherwise
        self.max_steps = 0
        self.mem = ""

    def on_start(self, info: dict) -> None:
        """Print the run's facts (parameters, device, data, length, notices) and start the bar on a terminal."""
        from rich.markup import escape
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        stats = info["train"]
        formats = ", ".join(f"{n} {fmt}" for fmt, n in stats.formats.items())
        line = (
            f"[bold]{self.title}[/]: {info['trainable_params']:,} trainable of {info['total_params']:,} parameters "
            f"on {info['device']}, optimizer {info['optimizer']}\n"
            f"data: {stats.records} records ({formats}) -> {stats.sequences} sequences, {_human(stats.tokens)} tokens"
            f"{', packed' if stats.packed else ''}; {stats.truncated} truncated"
        )
        if stats.dropped_no_target:
            line += f", {stats.dropped_no_target} dropped (no target token left after truncation)"
        if info["eval"] is not None:
            line += f"; eval: {info['eval'].sequences} sequences"
        sources = getattr(stats, "sources", [])
        if len(sources) > 1:  # one line per source: what it read and what it puts in an epoch
            width = max(len(f"{s.name} ({s.path})") for s in sources)
            for s in sources:
                line += (
                    f"\n  {escape(f'{s.name} ({s.path})'.ljust(width))}  {s.records} records -> {s.sequences} sequences, "
                    f"{_human(s.tokens)} tokens, {_human(s.target_tokens)} with loss"
                )
        line += f"\n{_start_line(info)}"
        for notice in info.get("notices", []):
            line += f"\n{escape(notice)}"
        if info["resumed_from"] is not None:
            line += f"\nresuming from step {info['resumed_from']}"
        self.console.print(line, soft_wrap=True)
        self.max_steps = info["max_steps"]
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TextColumn("{task.fields[mem]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            self.title, total=info["max_steps"], completed=info["start_step"], loss="-", lr="-", speed="-", mem=""
        )

    def on_step(self, record: dict) -> None:
        """Move the bar (live) or remember the memory peak for the next plain line."""
        self.mem = f"{record['mem_gib']:.2f} GiB" if "mem_gib" in record else ""
        if not self.live:
            return
        self.progress.update(
            self.task,
            completed=record["step"],
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            speed=_human(record["tokens_per_s"]),
            mem=self.mem,
        )

    def on_log(self, record: dict) -> None:
        """Without a live bar: one plain line with the numbers of the metrics.jsonl row (the window's means)."""
        if self.live:
            return
        self.console.print(
            f"step {record['step']}/{self.max_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"{_human(record['tokens_per_s'])} tok/s" + (f" mem {self.mem}" if self.mem else ""),
            soft_wrap=True,
            highlight=False,
        )

    def on_eval(self, record: dict) -> None:
        """One line per eval pass."""
        self.console.print(
            f"step {record['step']}: eval loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.2f}"
        )

    def on_checkpoint(self, step: int, path) -> None:
        """One dim line per checkpoint."""
        self.console.print(f"[dim]step {step}: checkpoint {path}[/]", soft_wrap=True)

    def on_end(self, result: TrainResult) -> None:
        """Stop the bar."""
        self.close()

    def close(self) -> None:
        """Stop the live display (also on errors, so the terminal is left clean)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def summary_table(result: TrainResult, title: str = "run summary"):
    """A rich Table with the run's outcome."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row(
        "steps",
        f"{result.steps}" + (f" (resumed from {result.resumed_from})" if result.resumed_from is not None else ""),
    )
    table.add_row("train loss (last log)", f"{result.train_loss:.4f}" if result.train_loss is not None else "-")
    if result.eval_loss is not None:
        table.add_row("eval loss", f"{result.eval_loss:.4f}")
        table.add_row("eval perplexity", f"{result.eval_perplexity:.2f}")
    table.add_row("tokens trained", f"{result.tokens:,}")
    table.add_row("tokens with loss", f"{result.target_tokens:,}")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("trainable params", f"{result.trainable_params:,} of {result.total_params:,}")
    table.add_row("adapter", str(result.adapter_dir))
    table.add_row("metrics", str(result.output_dir / "metrics.jsonl"))
    return table


def progress_console() -> Any:
    """The console `train()` shows its progress on: standard output, numbers and paths not coloured."""
    from rich.console import Console

    return Console(highlight=False)


def display_for_python() -> RichReporter | None:
    """What `train(config)` with no reporter shows: the CLI's display when standard output is a terminal or a
    notebook, else None (a script's output or a batch log stays as the script makes it)."""
    console = progress_console()
    if console.is_terminal or console.is_jupyter:
        return RichReporter(console, title="train")
    return None
