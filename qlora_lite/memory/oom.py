"""After a CUDA out-of-memory in training: the memory report for the run's settings against the GPU's memory,
and the one setting change that the memory model says would fit.

`train.train` turns `torch.OutOfMemoryError` into `errors.OutOfMemoryError` carrying an `OomAdvice`; the CLI
prints `OomAdvice.lines()` and exits 3. The changes are tried from the least to the most intrusive, and the
first that fits is the advice:

1. chunked loss (same results, no slowdown),
2. gradient checkpointing (same results, ~30% slower),
3. a smaller micro-batch with more accumulation, keeping the sequences per optimizer step (same results up to
   padding, slower), the largest micro-batch that fits,
4. activation offload to CPU memory (same results, slower on PCIe),
5. a shorter `data.max_seq_len` at the current micro-batch, the longest that fits (changes what is trained on;
   offered only when the prediction is over the budget).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config.settings import TrainConfig
from ..errors import QloraLiteError

if TYPE_CHECKING:
    from .inventory import Inventory
    from .report import MemoryReport
    from .settings import RunSettings

# Budget override in bytes or a GPU name (memory_advice.parse_budget): planning for a GPU that is shared, or
# giving the CPU tests a budget.
GPU_MEMORY_ENV = "QLORA_LITE_GPU_MEMORY"
# Test hook: "step:N" raises torch.OutOfMemoryError inside optimizer step N, after its backward passes.
OOM_ENV = "QLORA_LITE_TEST_OOM"
# When the estimate already fits and the GPU still ran out, aim this fraction under the estimate.
MARGIN_WHEN_FITTING = 0.85


def oom_fault_point(step: int) -> None:
    """Raise `torch.OutOfMemoryError` when the test environment asks for it at this step; else nothing."""
    if os.environ.get(OOM_ENV) == f"step:{step}":
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {OOM_ENV} at step {step})."
        )


def gpu_budget(device: torch.device) -> tuple[int | None, str | None]:
    """(bytes, label) of the memory to plan for: `QLORA_LITE_GPU_MEMORY`, else the CUDA device's total, else unknown."""
    override = os.environ.get(GPU_MEMORY_ENV)
    if override:
        from .advice import parse_budget

        return parse_budget(override)
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return int(props.total_memory), props.name
    return None, None


@dataclass
class Change:
    """One setting change: what it is in words, the config keys it sets, and the predicted peak after it."""

    description: str
    overrides: dict[str, Any]
    total: int
    fits: bool
    resumable: bool  # --resume accepts it (the checkpoint's settings fingerprint does not include these keys)

    def flags(self) -> str:
        """The change as command-line overrides."""
        return " ".join(
            f"--{key} {str(value).lower() if isinstance(value, bool) else value}"
            for key, value in self.overrides.items()
        )


@dataclass
class OomAdvice:
    """The memory report for the run's settings against the budget, and the change to make."""

    budget: int | None
    budget_label: str | None
    total: int  # predicted peak for the run's settings
    settings: str  # the settings the prediction is for, in words
    change: Change | None
    note: str | None = None

    def lines(self) -> list[str]:
        """The advice as a few lines of text, for the CLI to print."""
        from .advice import gib

        if self.budget is not None:
            verdict = f"over by {gib(self.total - self.budget)} GiB" if self.total > self.budget else "predicted to fit"
            budget = f" vs {gib(self.budget)} GiB on {self.budget_label}: {verdict}"
        else:
            budget = " (GPU memory unknown)"
        out = [f"memory: predicted peak {gib(self.total)} GiB for {self.settings}{budget}"]
        if self.note:
            out.append(f"note: {self.note}")
        if self.change is None:
            out.append(
                "fix: no single setting change lowers the prediction; use a GPU with more memory or a smaller model."
            )
            return out
        c = self.change
        if self.budget is not None and self.total > self.budget:
            verdict = "fits" if c.total <= self.budget else "still over the budget; combine it with further changes"
        else:
            verdict = f"{1 - c.total / self.total:.0%} under the current prediction"
        out.append(f"fix: {c.description}: predicted {gib(c.total)} GiB, {verdict}")
        if c.resumable:
            out.append(f"run: the same command with --resume {c.flags()}")
        else:
            out.append(
                f"run: the same command with {c.flags()} and a new output_dir (a checkpoint's data order depends on it)"
            )
        return out


def memory_settings(config: TrainConfig) -> RunSettings:
    """The memory model's run settings for a training config, on CUDA (`settings.settings_from_config`)."""
    from .settings import settings_from_config

    return settings_from_config(config, device="cuda")


def _candidates(config: TrainConfig, s: RunSettings) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(description, config overrides, memory-setting changes), least intrusive first."""
    from .settings import chunked_loss_changes

    t = config.train
    out = []
    if t.checkpoint_every > 1:  # spare memory traded for speed is the first thing to give back
        out.append((
            f"every layer recomputed (train.checkpoint_every {t.checkpoint_every} -> 1)",
            {"train.checkpoint_every": 1},
            {"checkpoint_every": 1},
        ))  # fmt: skip
    if not s.chunked_loss:
        changes = chunked_loss_changes(s)
        chunk = changes["loss_chunk_tokens"]
        out.append((f"chunked loss (train.loss_chunk_tokens {chunk})", {"train.loss_chunk_tokens": chunk}, changes))
    if not t.gradient_checkpointing:
        out.append(
            ("gradient checkpointing on", {"train.gradient_checkpointing": True}, {"gradient_checkpointing": True})
        )
    b, accum = t.micro_batch_size, t.grad_accum
    per_step = b * accum
    for smaller in range(b - 1, 0, -1):  # largest first: the least slowdown
        if per_step % smaller == 0:
            more = per_step // smaller
            out.append((
                f"micro-batch {b} -> {smaller} with grad_accum {accum} -> {more} (the same {per_step} sequences per optimizer step)",
                {"train.micro_batch_size": smaller, "train.grad_accum": more},
                {"batch_size": smaller, "grad_accum": more},
            ))  # fmt: skip
    if t.gradient_checkpointing and not t.offload_activations:
        every = t.checkpoint_every > 1  # offload runs with every layer checkpointed
        out.append((
            "activation offload to CPU memory" + (" with every layer recomputed" if every else ""),
            {"train.offload_activations": True, **({"train.checkpoint_every": 1} if every else {})},
            {"offload_activations": True, **({"checkpoint_every": 1} if every else {})},
        ))  # fmt: skip
    return out


def _longest_seq(inv: Inventory, report: MemoryReport, budget: int) -> int:
    """The longest sequence below the current one that fits at the current micro-batch (0 if none)."""
    from .advice import largest_fitting
    from .report import report_for, with_settings

    def fits(seq: int) -> bool:
        return report_for(inv, with_settings(report, seq_len=seq)).total <= budget

    return largest_fitting(fits, 1, report.settings.seq_len - 1)


def _resume_keys() -> set[str]:
    from ..config.settings import resume_keys

    return set(resume_keys())


def _resumable(overrides: dict[str, Any], keys: set[str]) -> bool:
    return not any(key in keys for key in overrides)


def _describe(config: TrainConfig) -> str:
    q, t = config.quant, config.train
    quant = "8-bit" if q.bits == 8 else f"4-bit {q.quant_type}"
    return (
        f"micro-batch {t.micro_batch_size} x {config.data.max_seq_len} tokens, grad_accum {t.grad_accum}, "
        f"r={config.lora.r}, {quant}"
    )


def advise_after_oom(config: TrainConfig, budget: int | None, budget_label: str | None = None) -> OomAdvice:
    """The memory report for `config` against `budget` bytes and the first change (see the module doc) that fits.

    When the prediction already fits the budget (the GPU still ran out: another process, fragmentation, or an
    estimate that is low for this setup), the change must bring the prediction 15% under itself instead, and a
    shorter sequence is not offered. When no single change reaches the target, the one with the lowest
    prediction is given, marked as not fitting. Without a budget, the target is 15% under the prediction.
    """
    from .inventory import build_inventory
    from .report import report_for, with_settings

    settings = memory_settings(config)
    inv = build_inventory(config.model)
    report = report_for(inv, settings)
    note = None
    over = budget is not None and report.total > budget
    if over:
        target = budget
    else:
        target = int(report.total * MARGIN_WHEN_FITTING)
        if budget is not None:
            note = (
                "the prediction is under the budget, yet the GPU ran out: another process may hold GPU memory "
                f"(check nvidia-smi) or the estimate is low for this setup, so the fix aims {1 - MARGIN_WHEN_FITTING:.0%} "
                "under the prediction"
            )
    keys = _resume_keys()
    options: list[Change] = []
    for description, overrides, changes in _candidates(config, settings):
        total = report_for(inv, with_settings(report, **changes)).total
        options.append(Change(description, overrides, total, total <= target, _resumable(overrides, keys)))
    # Truncating the data is advised only against a real budget, not to chase an estimate that already fits.
    seq = _longest_seq(inv, report, target) if over else 0
    if seq > 0:
        total = report_for(inv, with_settings(report, seq_len=seq)).total
        description = (
            f"data.max_seq_len {config.data.max_seq_len} -> {seq} (longer records are truncated"
            f"{', which needs data.truncation: true' if not config.data.truncation else ''})"
        )
        options.append(
            Change(description, {"data.max_seq_len": seq}, total, True, _resumable({"data.max_seq_len": seq}, keys))
        )
    fitting = [c for c in options if c.fits]
    lowering = [c for c in options if c.total < report.total]
    change = fitting[0] if fitting else min(lowering, key=lambda c: c.total, default=None)
    return OomAdvice(budget, budget_label, report.total, _describe(config), change, note)


def oom_message(exc: BaseException) -> str:
    """torch's out-of-memory message cut to what fits in one sentence ("CUDA out of memory; tried to allocate 2.00 GiB")."""
    text = str(exc)
    tried = re.search(r"Tried to allocate [0-9.]+ [KMGT]?i?B", text)
    head = text.split(".")[0].strip() or "out of memory"
    return f"{head}; {tried.group(0)[0].lower()}{tried.group(0)[1:]}" if tried else head


def out_of_memory_error(config: TrainConfig, failure: str, device: torch.device, last_checkpoint) -> QloraLiteError:
    """The `errors.OutOfMemoryError` for a run that ran out of GPU memory (`failure`: `oom_message` of torch's
    error), with the memory advice when it can be computed."""
    from ..errors import OutOfMemoryError

    where = (
        f"the last complete checkpoint is {last_checkpoint}"
        if last_checkpoint
        else "no checkpoint had been written yet"
    )
    advice = None
    try:
        budget, label = gpu_budget(device)
        advice = advise_after_oom(config, budget, label)
    except QloraLiteError as err:  # e.g. an architecture the memory model cannot describe: report the OOM anyway
        where += f" (no memory advice: {str(err).rstrip('.')})"
    return OutOfMemoryError(
        f"training ran out of GPU memory ({failure}); nothing from the failed step was saved and {where}.",
        advice,
    )
