"""What a finished run returns (`TrainResult`) and the events a run reports while it goes (`Reporter`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..data.encode import DatasetStats


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    eval_perplexity: float | None
    resumed_from: int | None
    tokens: int
    seconds: float
    data: DatasetStats
    eval_data: DatasetStats | None
    trainable_params: int
    total_params: int
    # loss-carrying tokens trained on (counted per step, so a micro-batch repeated within a step counts twice);
    # `tokens` counts every token that is not padding
    target_tokens: int = 0
    history: list[dict] = field(default_factory=list)
    # what resume found and did (skipped checkpoints, leftovers, changed data or schedule) and a step beyond the data
    notices: list[str] = field(default_factory=list)


class Reporter:
    """Receives training events; this base ignores them. `progress.RichReporter` renders them; `trackers` log them."""

    def on_start(self, info: dict) -> None:
        """Run facts before the first step: `max_steps` (the run's length, also when `train.epochs` sets it),
        `epochs` (`train.epochs`, None when `train.max_steps` is set), `micro_batches_per_epoch`,
        `sequences_per_step`, `start_step`, data statistics, parameter counts, device, resume step, and
        `notices`: what resume found and did (checkpoints skipped as incomplete or corrupted, leftovers removed, data
        changed under --allow-data-change, a changed max_steps / lr / schedule and what it changes), a step that
        asks for more micro-batches than the data holds, and a warmup clipped to the run's length."""

    def on_step(self, record: dict) -> None:
        """After every optimizer step: step, loss, lr, grad_norm, tokens_per_s, epoch (and mem_gib on CUDA)."""

    def on_log(self, record: dict) -> None:
        """Every `train.log_every` steps (and the last), with the line metrics.jsonl gets: step, the window's mean
        loss, lr, grad_norm, tokens, epoch, tokens_per_s (the window's mean)."""

    def on_eval(self, record: dict) -> None:
        """After an eval pass: step, eval_loss, eval_ppl."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a checkpoint directory is complete."""

    def on_end(self, result: TrainResult) -> None:
        """After the final adapter is written."""

    def close(self) -> None:
        """Release what the reporter holds (a live display, an open file); called once the run ends, also when it
        fails. Must do nothing when called again."""


class Reporters(Reporter):
    """Several reporters as one: each event goes to each, in order."""

    def __init__(self, *reporters: Reporter):
        self.reporters = [r for r in reporters if r is not None]

    def on_start(self, info: dict) -> None:
        for r in self.reporters:
            r.on_start(info)

    def on_step(self, record: dict) -> None:
        for r in self.reporters:
            r.on_step(record)

    def on_log(self, record: dict) -> None:
        for r in self.reporters:
            r.on_log(record)

    def on_eval(self, record: dict) -> None:
        for r in self.reporters:
            r.on_eval(record)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for r in self.reporters:
            r.on_checkpoint(step, path)

    def on_end(self, result: TrainResult) -> None:
        for r in self.reporters:
            r.on_end(result)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
