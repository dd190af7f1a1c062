"""One training run between its steps (`Run`): what a checkpoint saves, the steps themselves, eval, checkpoints,
the final adapter and exact resume; `loop.train` creates it and handles what ends it (out of memory, interrupts).

Under torchrun every rank holds a `Run`: micro-batch k of each step goes to rank k mod W, the step's loss normaliser
comes from the labels of all ranks' micro-batches, and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import yaml

from ..config.settings import TrainConfig
from ..data.batching import IGNORE_INDEX, BatchOrder, collate, pad_id
from ..errors import TrainingError
from ..export.adapter import save_adapter
from ..io.atomic import atomic_dir, write_text_atomic
from ..io.faults import fault_point
from ..memory.oom import oom_fault_point
from ..model.loader import default_device
from ..model.lora import count_parameters
from .arguments import check_output_dir
from .checkpoint import (
    check_resume_data,
    check_resume_settings,
    check_resume_world,
    data_fingerprint,
    find_resume_checkpoint,
    fingerprint,
    latest_checkpoint,
    prune_checkpoints,
    rank_rng_tensors,
    read_trainer_state,
    restore_checkpoint,
    save_checkpoint,
    schedule_notices,
)  # fmt: skip
from .distributed import (
    SINGLE,
    CollectiveError,
    World,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    gather_objects,
    lost_peer,
    run_on_main,
)  # fmt: skip
from .interrupt import Interrupted, signal_of
from .metrics import MetricsLog
from .reporter import Reporter, Reporters, TrainResult
from .schedule import data_notices, lr_at, run_steps, warmup_notice, world_notices
from .setup import prepare_run
from .step import NonFiniteStepError, evaluate, train_step
from .trackers import make_trackers


def _write_failed(what: str, out: Path, exc: OSError, last_good: Path | None) -> TrainingError:
    """A failed write (disk full, permissions) as one sentence; atomic writes left the previous files intact."""
    where = f"the last complete checkpoint is {last_good}" if last_good else "no checkpoint had been written yet"
    return TrainingError(
        f"writing {what} in {out} failed ({exc}); nothing partial was kept and {where}; "
        "free disk space or fix permissions, then run again with --resume."
    )


class Run:
    """One training run's state between steps (what a checkpoint saves) and its steps."""

    def __init__(
        self,
        config: TrainConfig,
        reporter: Reporter,
        owned: list[Reporter] | None = None,
        world: World = SINGLE,
        device: torch.device | None = None,
    ):
        self.config, self.s, self.reporter = config, config.train, reporter
        self.world = world
        self.device = device if device is not None else default_device()
        self.owned = list(owned or [])  # reporters this run made (trackers, the display) and closes
        self.out = Path(config.output_dir)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.step, self.window_sum, self.window_steps, self.tokens_total = 0, 0.0, 0, 0
        self.window_tokens, self.window_seconds, self.targets_total = 0, 0.0, 0  # tokens/s of the window; loss tokens
        self.steps = self.s.max_steps  # the run's length (with train.epochs: set once the data is encoded)
        self.resume_state: dict | None = None
        self.resumed_from: int | None = None
        self.last_good: Path | None = None
        self.last_train_loss: float | None = None
        self.last_eval: dict | None = None
        self.phase = "prepare"  # then "train", then "final": what an interruption message says was going on

    def run(self, resume: bool, allow_data_change: bool = False) -> TrainResult:
        """Prepare, resume if asked, train for the run's length, write the final adapter; return the result."""
        s, out, world = self.s, self.out, self.world
        torch.manual_seed(s.seed)
        # Which checkpoint, and whether its settings and data fit, is decided before the model loads; rank 0 alone
        # looks (resuming removes leftovers of killed writes) and tells the others.
        start_from, notices, self.resume_state, self.data_files = run_on_main(
            world, lambda: self._inspect_output(resume, allow_data_change), "checking the run directory"
        )
        parts = prepare_run(self.config, self.device, world)
        if world.rank:  # a rank's own dropout stream; rank 0's is a single process's
            torch.manual_seed((s.seed + 0x9E3779B97F4A7C15 * world.rank) % 2**63)
        self.model, self.optimizer, self.tokenizer = parts.model, parts.optimizer, parts.tokenizer
        self.train_ds, self.eval_ds = parts.train_data, parts.eval_data
        self.pad = pad_id(parts.tokenizer)
        self.order = BatchOrder(len(self.train_ds), s.micro_batch_size, s.seed)
        per_epoch = self.order.batches_per_epoch
        self.steps = run_steps(s, per_epoch, world.size)
        if start_from is not None and s.max_steps <= 0:  # the length train.epochs makes is known only now
            notices += schedule_notices(self.resume_state, s, start_from, self.steps, per_epoch)
        # Each example's loss-carrying tokens, as collate + target_count would count them: labels after the first.
        self.example_targets = [sum(lab != IGNORE_INDEX for lab in e.labels[1:]) for e in self.train_ds.examples]
        notices += (
            parts.notices + data_notices(s, len(self.train_ds), per_epoch, world.size) + warmup_notice(s, self.steps)
        )
        notices += world_notices(s, world.size, world.nodes)
        if start_from is not None:
            notices += self._restore(start_from)
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        trackers = make_trackers(s.report_to, out, self.config.to_dict()) if world.is_main else []
        if trackers:
            self.owned += trackers
            self.reporter = Reporters(self.reporter, *trackers)
        trainable, total = count_parameters(self.model)
        # the last micro-batch of an epoch may be smaller
        per_step = min(s.micro_batch_size, len(self.train_ds)) * s.grad_accum * world.size
        self.reporter.on_start({
            "max_steps": self.steps, "epochs": s.epochs if s.max_steps <= 0 else None, "grad_accum": s.grad_accum,
            "micro_batches_per_epoch": per_epoch, "sequences_per_step": per_step,
            "start_step": self.step, "resumed_from": self.resumed_from,
            "device": str(self.device), "optimizer": self.optimizer.name, "train": self.train_ds.stats,
            "eval": self.eval_ds.stats if self.eval_ds else None, "trainable_params": trainable,
            "total_params": total, "output_dir": str(out), "notices": notices, "world_size": world.size,
        })  # fmt: skip
        started = time.perf_counter()
        self.model.train()
        self.phase = "train"
        while self.step < self.steps:
            self._one_step()
        if self.eval_ds is not None and self.last_eval is None:  # resumed at the last step: report the final eval
            self._evaluate(report=False)
        self.phase = "final"
        self._save_final_adapter()
        history = self.metrics.read() if world.is_main else []
        if self.last_train_loss is None:
            self.last_train_loss = next((r["loss"] for r in reversed(history) if "loss" in r), None)
        ev = self.last_eval
        result = TrainResult(
            output_dir=out, adapter_dir=out / "adapter", steps=self.step, train_loss=self.last_train_loss,
            eval_loss=ev["eval_loss"] if ev else None, eval_perplexity=ev["eval_ppl"] if ev else None,
            resumed_from=self.resumed_from, tokens=self.tokens_total, target_tokens=self.targets_total,
            seconds=time.perf_counter() - started,
            data=self.train_ds.stats, eval_data=self.eval_ds.stats if self.eval_ds else None,
            trainable_params=trainable, total_params=total, history=history, notices=notices,
        )  # fmt: skip
        self.reporter.on_end(result)
        return result

    def _inspect_output(
        self, resume: bool, allow_data_change: bool
    ) -> tuple[Path | None, list[str], dict | None, dict]:
        """(On rank 0.) The output dir checked, the checkpoint to resume from with its notices and trainer state,
        and the data files' fingerprint."""
        check_output_dir(self.out, resume)
        self.data_files = data_fingerprint(self.config)
        start_from, notices = self._find_resume(allow_data_change) if resume else (None, [])
        return start_from, notices, self.resume_state, self.data_files

    def _find_resume(self, allow_data_change: bool) -> tuple[Path | None, list[str]]:
        """The newest good checkpoint (None: start from step 0), checked against this config and the data files;
        and the notices of what resume found, removed or sees changed."""
        start_from, notices = find_resume_checkpoint(self.out)
        if start_from is None:
            if self.metrics.path.exists():
                self.metrics.truncate_to(0)  # killed before its first checkpoint: start the log over with the run
            return None, notices
        state = self.resume_state = read_trainer_state(start_from)
        check_resume_settings(state, self.config, start_from)
        check_resume_world(state, self.world.size, start_from)
        notices += check_resume_data(state, self.data_files, start_from, allow_data_change)
        if self.s.max_steps > 0:  # a length set by train.epochs is checked once the data is encoded
            notices += schedule_notices(state, self.s, start_from)
        return start_from, notices

    def _restore(self, start_from: Path) -> list[str]:
        """Load the checkpoint's weights, optimizer, RNG, data position and logging window."""
        s = self.s
        state = restore_checkpoint(
            start_from, self.optimizer, self.device, self.world.rank if self.world.distributed else None
        )
        self.step = self.resumed_from = state["step"]
        pos = state["data"]
        self.order = BatchOrder(len(self.train_ds), s.micro_batch_size, s.seed, pos["epoch"], pos["index"])
        self.window_sum, self.window_steps = state["window_loss_sum"], state["window_steps"]
        self.tokens_total = state["tokens"]
        # written since the window's tokens/s and the loss-token count; an older checkpoint's count from here
        self.targets_total = state.get("target_tokens", 0)
        self.window_tokens, self.window_seconds = state.get("window_tokens", 0), state.get("window_seconds", 0.0)
        if self.world.is_main:
            self.metrics.truncate_to(self.step)
        self.last_good = start_from
        notices = []
        saved_decay = self.optimizer.param_groups[0].get("weight_decay")
        if saved_decay is not None and saved_decay != s.weight_decay:  # the optimizer state carried the old value
            for group in self.optimizer.param_groups:
                group["weight_decay"] = s.weight_decay
            notices.append(
                f"train.weight_decay changed from {saved_decay!r} to {s.weight_decay!r}: steps from {self.step + 1} "
                "on use the new setting"
            )
        return notices

    def close(self) -> None:
        """Close the reporters this run made (trackers flush their files; the display stops), also after a failure."""
        for reporter in self.owned:
            reporter.close()

    def interrupted(self, exc: KeyboardInterrupt) -> Interrupted:
        """The `Interrupted` to raise for a SIGTERM / Ctrl-C: where the run was and what to resume from."""
        if self.phase == "prepare":
            where = "interrupted while preparing the run"
        elif self.phase == "final":
            where = f"interrupted while writing the final adapter after step {self.step}"
        else:
            where = f"interrupted at step {self.step}"
        if self.world.distributed:  # torchrun stops every rank with SIGTERM when one of them fails
            where += (
                f" on rank {self.world.rank} of {self.world.size} (when one rank fails, torchrun stops the others: "
                "the failed rank's message or exit code above says why)"
            )
        last = latest_checkpoint(self.out)  # from disk: the interrupt may have come just after a checkpoint's rename
        then = (
            f"the last complete checkpoint is {last}; run the same command with --resume to continue"
            if last
            else "no checkpoint had been written yet; run the same command with --resume to start over"
        )
        return Interrupted(f"{where}; {then}.", signal_of(exc))

    def _one_step(self) -> None:
        s = self.s
        self.step += 1
        step, t0 = self.step, time.perf_counter()
        lr = lr_at(step, s, self.steps)
        # The loss normaliser (the step's target count over all ranks) comes from the labels; the micro-batches are
        # collated one at a time as the step uses them, so a large grad_accum never holds more than one in memory.
        # Rank r of W takes micro-batch r of every W in the order: its slice of each global micro-batch.
        w, examples = self.world, self.train_ds.examples
        mine, targets, world_targets, world_tokens = [], 0, 0, 0
        for k in range(s.grad_accum * w.size):
            indices = self.order.next_indices()
            count = sum(self.example_targets[i] for i in indices)
            world_targets += count
            world_tokens += sum(len(examples[i]) for i in indices)
            if k % w.size == w.rank:
                mine.append(indices)
                targets += count
        batches = (collate([examples[i] for i in indices], self.pad) for indices in mine)
        reduce = (lambda t: all_reduce_sum(t, w, f"step {step}'s gradient sum")) if w.distributed else None
        try:
            result = train_step(
                self.model, self.optimizer, batches, self.device, bf16=s.bf16, loss_chunk_tokens=s.loss_chunk_tokens,
                max_grad_norm=s.max_grad_norm, lr=lr, before_update=lambda: oom_fault_point(step), targets=targets,
                all_reduce=reduce, world_targets=world_targets if w.distributed else None,
            )  # fmt: skip
        except CollectiveError as exc:
            raise TrainingError(f"step {step}: {exc}; {self._resume_hint()}.") from None
        except RuntimeError as exc:  # a collective FSDP runs inside forward and backward
            lost = lost_peer(w, f"step {step}'s forward and backward", exc)
            if lost is None:
                raise
            raise TrainingError(f"step {step}: {lost}; {self._resume_hint()}.") from None
        except NonFiniteStepError as exc:
            where = (
                f"the last good checkpoint is {self.last_good}"
                if self.last_good
                else "no checkpoint had been written yet"
            )
            raise TrainingError(
                f"step {step}: {exc}; {where} (lower train.lr, check the data, then run again with --resume)."
            ) from None
        seconds = time.perf_counter() - t0
        if w.distributed:  # the step's counts over all ranks
            result.tokens, result.targets = world_tokens, world_targets
        self.tokens_total += result.tokens
        self.targets_total += result.targets
        self.window_sum += result.loss
        self.window_steps += 1
        self.window_tokens += result.tokens
        self.window_seconds += seconds
        record = {
            "step": step,
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": result.tokens / max(seconds, 1e-9),
            "epoch": round(self.order.epochs_done, 4),
        }
        if self.device.type == "cuda":
            record["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.reporter.on_step(record)
        if step % s.log_every == 0 or step == self.steps:
            self.last_train_loss = self.window_sum / self.window_steps
            row = {  # the window's means: loss per step, tokens/s as its tokens over its seconds
                "step": step, "loss": self.last_train_loss, "lr": lr, "grad_norm": result.grad_norm,
                "tokens": self.tokens_total, "epoch": record["epoch"],
                "tokens_per_s": round(self.window_tokens / max(self.window_seconds, 1e-9), 1),
            }  # fmt: skip
            if w.is_main:
                self.metrics.append(row)
            self.reporter.on_log(row)
            self.window_sum, self.window_steps, self.window_tokens, self.window_seconds = 0.0, 0, 0, 0.0
        if self.eval_ds is not None and ((s.eval_every and step % s.eval_every == 0) or step == self.steps):
            self._evaluate(report=True)
        if (s.save_every and step % s.save_every == 0) or step == self.steps:
            self._checkpoint()

    def _resume_hint(self) -> str:
        """Where a failed run can resume from."""
        if self.last_good:
            return f"the last complete checkpoint is {self.last_good}; run the same command with --resume to continue"
        return "no checkpoint had been written yet; run the same command with --resume to start over"

    def _evaluate(self, report: bool) -> None:
        s, w = self.s, self.world
        reduce = (lambda t: all_reduce_sum(t, w, f"the eval at step {self.step}")) if w.distributed else None
        try:
            loss, _ = evaluate(
                self.model, self.eval_ds, s.micro_batch_size, self.pad, self.device, s.bf16, s.loss_chunk_tokens,
                rank=w.rank, ranks=w.size, all_reduce=reduce,
            )  # fmt: skip
        except CollectiveError as exc:
            raise TrainingError(f"{exc}; {self._resume_hint()}.") from None
        except RuntimeError as exc:  # FSDP's all-gathers in the eval forward
            lost = lost_peer(w, f"the eval at step {self.step}", exc)
            if lost is None:
                raise
            raise TrainingError(f"{lost}; {self._resume_hint()}.") from None
        self.last_eval = {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))}
        if report and w.is_main:
            self.metrics.append(self.last_eval)
            self.reporter.on_eval(self.last_eval)

    def _checkpoint(self) -> None:
        s, step = self.s, self.step
        trainer_state = {
            "step": step, "data": self.order.state(),
            "schedule": {"name": s.schedule, "lr": s.lr, "warmup_steps": s.warmup_steps, "max_steps": self.steps,
                         "epochs": s.epochs},
            "window_loss_sum": self.window_sum, "window_steps": self.window_steps, "tokens": self.tokens_total,
            "window_tokens": self.window_tokens, "window_seconds": self.window_seconds,
            "target_tokens": self.targets_total,
            "fingerprint": fingerprint(self.config), "data_files": self.data_files,
            "world": {"size": self.world.size},
        }  # fmt: skip
        w, rng = self.world, None
        if w.distributed:  # every rank's generator states go into rank 0's checkpoint
            try:
                gathered = all_gather_objects(rank_rng_tensors(w.rank, self.device), w, f"checkpoint step-{step}")
            except CollectiveError as exc:
                raise TrainingError(f"{exc}; {self._resume_hint()}.") from None
            rng = {k: v.cpu() for states in gathered for k, v in states.items()}
        adapter, optimizer_state = self._gathered(f"checkpoint step-{step}", optimizer=True)
        path = self.out / "checkpoints" / f"step-{step}"
        if w.is_main:
            try:
                path = save_checkpoint(
                    self.out / "checkpoints", step, self.model, self.optimizer, trainer_state, rng, adapter,
                    optimizer_state,
                )  # fmt: skip
            except OSError as exc:
                raise _write_failed(f"checkpoint step-{step}", self.out, exc, self.last_good) from None
            prune_checkpoints(self.out, s.keep_checkpoints)
        if w.distributed:  # no rank goes on (or reports the checkpoint) before it is complete on disk
            try:
                barrier(w, f"checkpoint step-{step}")
            except CollectiveError as exc:
                raise TrainingError(f"{exc}; {self._resume_hint()}.") from None
        self.last_good = path
        self.reporter.on_checkpoint(step, path)
        fault_point("after-checkpoint", step)

    def _gathered(self, what: str, optimizer: bool = False) -> tuple[dict | None, dict | None]:
        """A sharded run's adapter gathered whole and (with `optimizer`) every rank's optimizer state, on rank 0;
        (None, None) when the model is not sharded. Collectives: every rank calls it."""
        if not self.optimizer.sharded:
            return None, None
        from .fsdp import full_adapter_state

        try:
            adapter = full_adapter_state(self.model)
            states = gather_objects(self.optimizer.state_dict(), self.world, what) if optimizer else None
        except CollectiveError as exc:
            raise TrainingError(f"{exc}; {self._resume_hint()}.") from None
        except RuntimeError as exc:  # the gather inside DTensor.full_tensor
            lost = lost_peer(self.world, f"gathering the adapter for {what}", exc)
            if lost is None:
                raise
            raise TrainingError(f"{lost}; {self._resume_hint()}.") from None
        return adapter, ({"name": self.optimizer.name, "ranks": states} if states is not None else None)

    def _save_final_adapter(self) -> None:
        """adapter/: the PEFT adapter and the tokenizer with the chat template training used (as axolotl and Unsloth
        save it), so `chat`, `generate` and the merged export format conversations as training did."""
        adapter, _ = self._gathered("the final adapter")
        if not self.world.is_main:
            return
        try:
            with atomic_dir(self.out / "adapter", overwrite=True) as tmp:  # old adapter/ or new, never a partial one
                save_adapter(self.model, tmp, adapter)
                self.tokenizer.save_pretrained(tmp)
                fault_point("in-final-adapter", self.step)
        except OSError as exc:
            raise _write_failed("the final adapter", self.out, exc, self.last_good) from None
