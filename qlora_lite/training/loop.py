"""The QLoRA training loop: steps, logging, eval, checkpoints and exact resume.

`train(config)` prepares the run (`setup.prepare_run`), then repeats the one training step (`step.train_step`)
until `max_steps`, writing `metrics.jsonl`, checkpoints (`checkpoint`) and the final adapter. It never prints:
progress goes to a `Reporter`.

Resume is exact on the CPU: a checkpoint holds everything the next step depends on (fp32 master weights and
AdamW state, the torch RNG states that drive dropout, the data position as (epoch, batch) of a seed-determined
order, the partial logging window), and the learning rate is a pure function of the step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import yaml

from ..config.load import load_config
from ..config.settings import TrainConfig
from ..data.batching import BatchOrder, collate, pad_id
from ..errors import ConfigError, TrainingError
from ..export.adapter import save_adapter
from ..io.atomic import atomic_dir, write_text_atomic
from ..io.faults import fault_point
from ..io.lock import DirectoryLock
from ..memory.oom import oom_fault_point, oom_message, out_of_memory_error
from ..model.loader import default_device
from ..model.lora import count_parameters
from .checkpoint import (
    check_resume_settings,
    find_resume_checkpoint,
    fingerprint,
    latest_checkpoint,
    prune_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)  # fmt: skip
from .metrics import MetricsLog
from .reporter import Reporter, TrainResult
from .schedule import lr_at
from .setup import prepare_run
from .step import NonFiniteStepError, evaluate, train_step

__all__ = ["Reporter", "TrainResult", "train"]


def _as_config(config: TrainConfig | str | Path) -> TrainConfig:
    if isinstance(config, TrainConfig):
        config.validate()
        return config
    return load_config(config)


def _check_output_dir(out: Path, resume: bool) -> None:
    if resume:
        return
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) or (out / "metrics.jsonl").exists():
        raise ConfigError(
            f"{out} already holds a training run; pass --resume (resume=True) to continue it or choose another output_dir."
        )


def train(config: TrainConfig | str | Path, *, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Fine-tune with QLoRA as the config says; `config` is a `TrainConfig` or a YAML path.

    With `resume`, continue from the newest complete checkpoint in `output_dir` (a fresh start if there
    is none). Raises `ConfigError` / `DataError` for bad settings or data, and `TrainingError` when the
    loss or the gradient norm stops being finite (the last good checkpoint is kept).
    """
    config = _as_config(config)
    # One process per run dir: a second `train` on it would interleave checkpoints and metrics.
    with DirectoryLock(config.output_dir, purpose="qlora-lite train"):
        try:
            return _Run(config, reporter or Reporter()).run(resume)
        except torch.OutOfMemoryError as exc:
            failure = oom_message(exc)  # only the text: the traceback holds the failed step's tensors
    # Raised outside the handler, so those tensors are freed before anything else runs.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise out_of_memory_error(config, failure, default_device(), latest_checkpoint(config.output_dir))


def _write_failed(what: str, out: Path, exc: OSError, last_good: Path | None) -> TrainingError:
    """A failed write (disk full, permissions) as one sentence; atomic writes left the previous files intact."""
    where = f"the last complete checkpoint is {last_good}" if last_good else "no checkpoint had been written yet"
    return TrainingError(
        f"writing {what} in {out} failed ({exc}); nothing partial was kept and {where}; "
        "free disk space or fix permissions, then run again with --resume."
    )


class _Run:
    """One training run's state between steps (what a checkpoint saves) and its steps."""

    def __init__(self, config: TrainConfig, reporter: Reporter):
        self.config, self.s, self.reporter = config, config.train, reporter
        self.out = Path(config.output_dir)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.step, self.window_sum, self.window_steps, self.tokens_total = 0, 0.0, 0, 0
        self.resumed_from: int | None = None
        self.last_good: Path | None = None
        self.last_train_loss: float | None = None
        self.last_eval: dict | None = None

    def run(self, resume: bool) -> TrainResult:
        """Prepare, resume if asked, train to max_steps, write the final adapter; return the result."""
        s, out = self.s, self.out
        _check_output_dir(out, resume)
        self.device = default_device()
        torch.manual_seed(s.seed)
        parts = prepare_run(self.config, self.device)
        self.model, self.optimizer = parts.model, parts.optimizer
        self.train_ds, self.eval_ds = parts.train_data, parts.eval_data
        self.pad = pad_id(parts.tokenizer)
        self.order = BatchOrder(len(self.train_ds), s.micro_batch_size, s.seed)
        notices = self._resume() if resume else []
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        trainable, total = count_parameters(self.model)
        self.reporter.on_start({
            "max_steps": s.max_steps, "start_step": self.step, "resumed_from": self.resumed_from,
            "device": str(self.device), "optimizer": self.optimizer.name, "train": self.train_ds.stats,
            "eval": self.eval_ds.stats if self.eval_ds else None, "trainable_params": trainable,
            "total_params": total, "output_dir": str(out), "notices": notices,
        })  # fmt: skip
        started = time.perf_counter()
        self.model.train()
        while self.step < s.max_steps:
            self._one_step()
        if self.eval_ds is not None and self.last_eval is None:  # resumed at max_steps: report the final eval
            self._evaluate(report=False)
        self._save_final_adapter()
        history = self.metrics.read()
        if self.last_train_loss is None:
            self.last_train_loss = next((r["loss"] for r in reversed(history) if "loss" in r), None)
        ev = self.last_eval
        result = TrainResult(
            output_dir=out, adapter_dir=out / "adapter", steps=self.step, train_loss=self.last_train_loss,
            eval_loss=ev["eval_loss"] if ev else None, eval_perplexity=ev["eval_ppl"] if ev else None,
            resumed_from=self.resumed_from, tokens=self.tokens_total, seconds=time.perf_counter() - started,
            data=self.train_ds.stats, eval_data=self.eval_ds.stats if self.eval_ds else None,
            trainable_params=trainable, total_params=total, history=history, notices=notices,
        )  # fmt: skip
        self.reporter.on_end(result)
        return result

    def _resume(self) -> list[str]:
        """Restore the newest good checkpoint (if any); return what resume found and did."""
        s = self.s
        start_from, notices = find_resume_checkpoint(self.out)
        if start_from is None:
            if self.metrics.path.exists():
                self.metrics.truncate_to(0)  # killed before its first checkpoint: start the log over with the run
            return notices
        state = json.loads((start_from / "trainer_state.json").read_text())
        check_resume_settings(state, self.config, start_from)
        state = restore_checkpoint(start_from, self.optimizer, self.device)
        self.step = self.resumed_from = state["step"]
        pos = state["data"]
        self.order = BatchOrder(len(self.train_ds), s.micro_batch_size, s.seed, pos["epoch"], pos["index"])
        self.window_sum, self.window_steps = state["window_loss_sum"], state["window_steps"]
        self.tokens_total = state["tokens"]
        self.metrics.truncate_to(self.step)
        self.last_good = start_from
        return notices

    def _one_step(self) -> None:
        s = self.s
        self.step += 1
        step, t0 = self.step, time.perf_counter()
        lr = lr_at(step, s)
        batches = [collate([self.train_ds.examples[i] for i in self.order.next_indices()], self.pad)
                   for _ in range(s.grad_accum)]  # fmt: skip
        try:
            result = train_step(
                self.model, self.optimizer, batches, self.device, bf16=s.bf16, loss_chunk_tokens=s.loss_chunk_tokens,
                max_grad_norm=s.max_grad_norm, lr=lr, before_update=lambda: oom_fault_point(step),
            )  # fmt: skip
        except NonFiniteStepError as exc:
            where = (
                f"the last good checkpoint is {self.last_good}"
                if self.last_good
                else "no checkpoint had been written yet"
            )
            raise TrainingError(
                f"step {step}: {exc}; {where} (lower train.lr, check the data, then run again with --resume)."
            ) from None
        self.tokens_total += result.tokens
        self.window_sum += result.loss
        self.window_steps += 1
        record = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens_per_s": result.tokens / max(time.perf_counter() - t0, 1e-9),
                  "epoch": round(self.order.epochs_done, 4)}  # fmt: skip
        if self.device.type == "cuda":
            record["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.reporter.on_step(record)
        if step % s.log_every == 0 or step == s.max_steps:
            self.last_train_loss = self.window_sum / self.window_steps
            self.metrics.append({
                "step": step, "loss": self.last_train_loss, "lr": lr, "grad_norm": result.grad_norm,
                "tokens": self.tokens_total, "epoch": record["epoch"], "tokens_per_s": round(record["tokens_per_s"], 1),
            })  # fmt: skip
            self.window_sum, self.window_steps = 0.0, 0
        if self.eval_ds is not None and ((s.eval_every and step % s.eval_every == 0) or step == s.max_steps):
            self._evaluate(report=True)
        if (s.save_every and step % s.save_every == 0) or step == s.max_steps:
            self._checkpoint()

    def _evaluate(self, report: bool) -> None:
        s = self.s
        loss, _ = evaluate(
            self.model, self.eval_ds, s.micro_batch_size, self.pad, self.device, s.bf16, s.loss_chunk_tokens
        )
        self.last_eval = {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))}
        if report:
            self.metrics.append(self.last_eval)
            self.reporter.on_eval(self.last_eval)

    def _checkpoint(self) -> None:
        s, step = self.s, self.step
        trainer_state = {
            "step": step, "data": self.order.state(),
            "schedule": {"name": s.schedule, "lr": s.lr, "warmup_steps": s.warmup_steps, "max_steps": s.max_steps},
            "window_loss_sum": self.window_sum, "window_steps": self.window_steps, "tokens": self.tokens_total,
            "fingerprint": fingerprint(self.config),
        }  # fmt: skip
        try:
            path = save_checkpoint(self.out / "checkpoints", step, self.model, self.optimizer, trainer_state)
        except OSError as exc:
            raise _write_failed(f"checkpoint step-{step}", self.out, exc, self.last_good) from None
        self.last_good = path
        prune_checkpoints(self.out, s.keep_checkpoints)
        self.reporter.on_checkpoint(step, path)
        fault_point("after-checkpoint", step)

    def _save_final_adapter(self) -> None:
        try:
            with atomic_dir(self.out / "adapter", overwrite=True) as tmp:  # old adapter/ or new, never a partial one
                save_adapter(self.model, tmp)
                fault_point("in-final-adapter", self.step)
        except OSError as exc:
            raise _write_failed("the final adapter", self.out, exc, self.last_good) from None
