"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases and a CSV file, as `Reporter`s.

Each logs what metrics.jsonl logs (every `train.log_every` steps, eval passes) and closes at the end. The
packages are optional extras, imported only when a run asks for them; a missing one is a one-line error naming
the extra to install, raised before the base model loads.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import ConfigError
from .reporter import Reporter, TrainResult

TRACKERS = ("tensorboard", "wandb", "csv")
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _require(name: str, module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"train.report_to asks for {name}, but the {module} package is not installed; "
            f'install it with `pip install "qlora-lite[{EXTRAS[name]}]"` or remove {name} from train.report_to.'
        )


class TensorBoardTracker(Reporter):
    """Scalars under train/ and eval/ in `output_dir/runs` (open with `tensorboard --logdir RUN/runs`)."""

    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "runs"))

    def on_log(self, record: dict) -> None:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "epoch"):
            if key in record:
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def on_eval(self, record: dict) -> None:
        self.writer.add_scalar("eval/loss", record["eval_loss"], record["step"])
        self.writer.add_scalar("eval/perplexity", record["eval_ppl"], record["step"])

    def on_end(self, result: TrainResult) -> None:
        self.close()

    def close(self) -> None:
        self.writer.close()  # flushes what is pending; a second call does nothing


class WandbTracker(Reporter):
    """A Weights & Biases run (project from WANDB_PROJECT, default qlora-lite) with the config attached."""

    def __init__(self, output_dir: Path, config: dict):
        import os

        import wandb

        self.wandb = wandb
        self.finished = False
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "qlora-lite"), dir=str(output_dir), config=config,
            name=output_dir.name, resume="allow",
        )  # fmt: skip

    def on_log(self, record: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def on_eval(self, record: dict) -> None:
        self.run.log({"eval/loss": record["eval_loss"], "eval/perplexity": record["eval_ppl"]}, step=record["step"])

    def on_end(self, result: TrainResult) -> None:
        self.close()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.run.finish()


class CsvTracker(Reporter):
    """`output_dir/metrics.csv`: one row per logged step or eval, the rows and columns of metrics.jsonl.

    Rewritten whole (atomically) on each event. A resumed run starts from metrics.jsonl as resume left it (cut
    back to the checkpoint's step), so the file keeps mirroring metrics.jsonl across resumes.
    """

    COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens", "epoch", "tokens_per_s", "eval_loss", "eval_ppl")

    def __init__(self, output_dir: Path):
        self.path = output_dir / "metrics.csv"
        self.log = output_dir / "metrics.jsonl"
        self.rows: list[dict] = []

    def on_start(self, info: dict) -> None:
        from .metrics import MetricsLog

        self.rows = MetricsLog(self.log).read()
        self._write()

    def _write(self) -> None:
        from ..io.atomic import atomic_file

        with atomic_file(self.path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def on_log(self, record: dict) -> None:
        self.rows.append(record)
        self._write()

    def on_eval(self, record: dict) -> None:
        self.rows.append(record)
        self._write()


def check_trackers(names: list[str]) -> None:
    """Refuse unknown tracker names and missing packages (before anything heavy runs)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to names {name!r}; use any of {', '.join(TRACKERS)}.")
        if name in EXTRAS:
            _require(name, name)


def make_trackers(names: list[str], output_dir: Path, config: dict) -> list[Reporter]:
    """The trackers a run's `train.report_to` asks for."""
    check_trackers(names)
    makers = {
        "tensorboard": lambda: TensorBoardTracker(output_dir),
        "wandb": lambda: WandbTracker(output_dir, config),
        "csv": lambda: CsvTracker(output_dir),
    }
    return [makers[name]() for name in dict.fromkeys(names)]  # a name given twice logs once
