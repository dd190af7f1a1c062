"""Budgets and fit recommendations on top of the memory model: GPU names, the largest micro-batch, the longest
sequence, and the single setting change that saves the most memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config.settings import SELECTIVE_RECOMPUTE_CLASHES
from ..config.units import UNIT_NAMES, parse_size
from ..errors import ConfigError
from .constants import GiB, MiB
from .inventory import Inventory
from .report import MemoryReport, report_for, with_settings
from .settings import chunked_loss_changes

# memory.total in MiB as nvidia-smi reports it for common boards (ECC on where the board ships with it);
# quoted from memory of typical driver output: check yours with `nvidia-smi --query-gpu=memory.total --format=csv`.
GPU_MEMORY_MIB = {
    "rtx-3060-12gb": 12288,
    "rtx-3080-10gb": 10240,
    "rtx-3090-24gb": 24576,
    "rtx-4060ti-16gb": 16380,
    "rtx-4070-12gb": 12282,
    "rtx-4080-16gb": 16376,
    "rtx-4090-24gb": 24564,
    "t4-16gb": 15360,
    "l4-24gb": 23034,
    "a10-24gb": 23028,
    "a10g-24gb": 23028,
    "v100-16gb": 16384,
    "v100-32gb": 32768,
    "a100-40gb": 40960,
    "a100-80gb": 81920,
    "l40s-48gb": 46068,
    "a6000-48gb": 49140,
    "h100-80gb": 81559,
    "h200-141gb": 143771,
}

MAX_SEARCH_BATCH = 4096
MAX_SEARCH_SEQ = 1 << 20


def parse_budget(text: str) -> tuple[int, str]:
    """(bytes, label) from '12GiB', '24GB', '11500MiB' or a GPU name such as 'rtx-3060-12gb'."""
    key = text.strip().lower()
    if key in GPU_MEMORY_MIB:
        return GPU_MEMORY_MIB[key] * MiB, f"{key} ({GPU_MEMORY_MIB[key]} MiB)"
    try:
        size = parse_size(text, what="GPU memory", example="12GiB")
    except ConfigError:  # parse_size's message knows sizes only; this one also names the GPUs
        raise ConfigError(
            f"GPU memory {text!r} is not a size or a known GPU; write a positive number with a unit "
            f"({UNIT_NAMES}), e.g. 12GiB, or one of: {', '.join(GPU_MEMORY_MIB)}."
        ) from None
    return size, text.strip()


@dataclass
class Switch:
    """One setting change and what it does to the total."""

    name: str
    changes: dict[str, Any]
    total: int
    saves: int


@dataclass
class Advice:
    """Verdict and recommendations for a report against a budget (budget-dependent fields are None without one)."""

    budget: int | None
    budget_label: str | None
    fits: bool | None
    headroom: int | None
    max_batch_size: int | None  # at the report's sequence length; 0 when even 1 does not fit
    max_seq_len: int | None  # at micro-batch 1; 0 when even 1 token does not fit
    seq_limit: int | None  # the model's context length (the search's upper end)
    switches: list[Switch] = field(default_factory=list)  # every single change that saves memory, biggest first
    faster: Switch | None = None  # the least recompute that still fits: spare memory traded for speed

    @property
    def best_switch(self) -> Switch | None:
        """The single change that saves the most, if any saves anything."""
        return self.switches[0] if self.switches else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = asdict(self)
        out["best_switch"] = asdict(self.best_switch) if self.best_switch else None
        out["faster"] = asdict(self.faster) if self.faster else None
        return out


def _fits(inv: Inventory, report: MemoryReport, budget: int, **changes: Any) -> bool:
    return report_for(inv, with_settings(report, **changes)).total <= budget


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n), or low - 1 when none does (also when high < low).

    `fits` must be monotone: true up to some value, false above it (memory grows with batch and sequence).
    Probes low, then high, then bisects keeping the invariant: `lo` fits and `hi` does not, so the answer is
    `lo` once they are adjacent; about log2(high - low) + 2 calls.
    """
    if high < low or not fits(low):
        return low - 1
    if fits(high):
        return high
    lo, hi = low, high
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_batch(inv: Inventory, report: MemoryReport, budget: int) -> int:
    """The largest micro-batch that fits at the report's sequence length, up to 4096 (0 if none does)."""
    return largest_fitting(lambda b: _fits(inv, report, budget, batch_size=b), 1, MAX_SEARCH_BATCH)


def longest_sequence(inv: Inventory, report: MemoryReport, budget: int) -> tuple[int, int]:
    """(longest sequence that fits at micro-batch 1, the upper end searched: the model's context length)."""
    limit = min(inv.max_positions or MAX_SEARCH_SEQ, MAX_SEARCH_SEQ)
    return largest_fitting(lambda n: _fits(inv, report, budget, batch_size=1, seq_len=n), 1, limit), limit


def candidate_switches(report: MemoryReport) -> list[tuple[str, dict[str, Any]]]:
    """Single setting changes worth trying from the report's settings."""
    s = report.settings
    out: list[tuple[str, dict[str, Any]]] = []
    if not s.gradient_checkpointing:
        out.append(("gradient checkpointing on", {"gradient_checkpointing": True}))
    if s.bits == 8:
        out.append(("4-bit instead of 8-bit", {"bits": 4}))
    if s.bits == 4 and not s.double_quant:
        out.append(("double quantization on", {"double_quant": True}))
    if not s.chunked_loss:
        out.append(("chunked loss", chunked_loss_changes(s)))
    selective = s.gradient_checkpointing and s.checkpoint_every > 1
    every = {"checkpoint_every": 1} if selective else {}  # offload and tiled MLP run with every layer checkpointed
    also = " (and every layer recomputed)" if selective else ""
    if selective:
        out.append(("every layer recomputed (checkpoint_every 1)", every))
    if s.gradient_checkpointing and not s.offload_activations:
        out.append(("activation offload" + also, {"offload_activations": True, **every}))
    if not s.tiled_mlp:
        out.append(("tiled MLP" + also, {"tiled_mlp": True, **every}))
    if s.rank > 1:
        out.append((f"rank {s.rank} -> {s.rank // 2}", {"rank": s.rank // 2}))
    if s.optimizer == "adamw":
        out.append(("paged 8-bit optimizer (paged_adamw_8bit)", {"optimizer": "paged_adamw_8bit"}))
    if s.attn_implementation == "eager" and report.details.get("default_attention") == "flash":
        out.append(("sdpa attention", {"attn_implementation": "sdpa"}))
    if s.lora_dropout > 0:
        out.append(("LoRA dropout off", {"lora_dropout": 0.0}))
    return out


def rank_switches(inv: Inventory, report: MemoryReport) -> list[Switch]:
    """Every candidate switch that lowers the total, biggest saving first."""
    switches = []
    for name, changes in candidate_switches(report):
        total = report_for(inv, with_settings(report, **changes)).total
        if total < report.total:
            switches.append(Switch(name, changes, total, report.total - total))
    return sorted(switches, key=lambda sw: -sw.saves)


def least_recompute(inv: Inventory, report: MemoryReport, budget: int) -> Switch | None:
    """With every layer checkpointed and memory to spare: the change that recomputes the fewest layers and still fits
    (checkpointing off, else the largest `checkpoint_every`), or None. Its `saves` is negative: it costs memory."""
    s = report.settings
    if (
        not s.gradient_checkpointing
        or s.checkpoint_every != 1
        or any(getattr(s, n) for n in SELECTIVE_RECOMPUTE_CLASHES)
    ):
        return None
    if report.total > budget:
        return None
    layers = inv.layers
    options = [("gradient checkpointing off (no layer recomputed)", {"gradient_checkpointing": False})]
    seen = set()
    for every in range(layers, 1, -1):  # larger k recomputes fewer layers: ceil(layers / k) of them
        recomputed = -(-layers // every)
        if recomputed not in seen and recomputed < layers:
            seen.add(recomputed)
            options.append(
                (f"checkpoint_every {every} ({recomputed} of {layers} layers recomputed)", {"checkpoint_every": every})
            )
    for name, changes in options:
        total = report_for(inv, with_settings(report, **changes)).total
        if total <= budget:
            return Switch(name, changes, total, report.total - total)
    return None


def advise(inv: Inventory, report: MemoryReport, budget: int | None = None, budget_label: str | None = None) -> Advice:
    """Verdict against `budget` (bytes) and the recommendations; searches run only with a budget."""
    switches = rank_switches(inv, report)
    if budget is None:
        return Advice(None, None, None, None, None, None, None, switches)
    max_seq, limit = longest_sequence(inv, report, budget)
    return Advice(
        budget=budget,
        budget_label=budget_label,
        fits=report.fits(budget),
        headroom=report.headroom(budget),
        max_batch_size=largest_batch(inv, report, budget),
        max_seq_len=max_seq,
        seq_limit=limit,
        switches=switches,
        faster=least_recompute(inv, report, budget),
    )


def gib(n: int) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / GiB:.2f}"
