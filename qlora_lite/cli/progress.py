"""Rich rendering of training progress for the command line (`train`, `demo`).

Part of the CLI layer: `train.train()` only calls a `Reporter`; `RichReporter` turns those calls into a
progress bar (step, loss, learning rate, tokens/s, memory on CUDA) on a terminal or in a notebook, or, when
the output is a file or a pipe (a batch job's log), into one plain line every `log_every` steps with the
window's mean loss and tokens/s; plus one line per eval and checkpoint, and `summary_table` into the
end-of-run table.
"""

from __future__ import annotations

from ..training.reporter import Reporter, TrainResult


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


class RichReporter(Reporter):
    """A rich progress bar and event lines on `console`."""

    def __init__(self, console, title: str = "training", log_every: int = 10):
        self.console = console
        self.title = title
        self.progress = None
        self.task = None
        self.log_every = max(1, log_every)
        self.live = console.is_terminal or console.is_jupyter  # a redrawn bar; plain lines otherwise
        self.max_steps = 0
        self.window: list[dict] = []

    def on_start(self, info: dict) -> None:
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
        mem = f"{record['mem_gib']:.2f} GiB" if "mem_gib" in record else ""
        if not self.live:
            self._plain_line(record, mem)
            return
        self.progress.update(
            self.task,
            completed=record["step"],
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            speed=_human(record["tokens_per_s"]),
            mem=mem,
        )

    def _plain_line(self, record: dict, mem: str) -> None:
        """One log line per `log_every` steps (and the last): means over the steps since the previous line."""
        self.window.append(record)
        step = record["step"]
        if step % self.log_every and step != self.max_steps:
            return
        n = len(self.window)
        loss = sum(r["loss"] for r in self.window) / n
        speed = sum(r["tokens_per_s"] for r in self.window) / n
        self.window = []
        self.console.print(
            f"step {step}/{self.max_steps} loss {loss:.4f} lr {record['lr']:.2e} {_human(speed)} tok/s"
            + (f" mem {mem}" if mem else ""),
            soft_wrap=True,
            highlight=False,
        )

    def on_eval(self, record: dict) -> None:
        self.console.print(
            f"step {record['step']}: eval loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.2f}"
        )

    def on_checkpoint(self, step: int, path) -> None:
        self.console.print(f"[dim]step {step}: checkpoint {path}[/]", soft_wrap=True)

    def on_end(self, result: TrainResult) -> None:
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
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("trainable params", f"{result.trainable_params:,} of {result.total_params:,}")
    table.add_row("adapter", str(result.adapter_dir))
    table.add_row("metrics", str(result.output_dir / "metrics.jsonl"))
    return table
