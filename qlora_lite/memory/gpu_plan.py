"""How many GPUs a model needs under FSDP: the fewest GPUs of a budget (one node, then more) whose per-rank memory
(`memory.ranks`) fits, and the activation settings (checkpointing, chunked loss, micro-batch 1, offload, a shorter
sequence) that make it fit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import ConfigError
from .advice import largest_fitting
from .inventory import Inventory
from .ranks import GPUS_PER_NODE, MIN_SEARCH_SEQ, SEQ_STEP, RankReport, rank_report
from .settings import RunSettings, chunked_loss_changes


@dataclass
class GpuPlan:
    """The fewest GPUs of a budget that fit under FSDP, and the settings they fit with."""

    gpus: int
    nodes: int
    budget: int
    budget_label: str | None
    settings: RunSettings
    changes: list[str]  # what changed from the asked settings, in words, in the order applied
    per_rank: RankReport = field(repr=False)

    def settings_in_words(self) -> str:
        s = self.settings
        parts = [f"seq {s.seq_len}", f"batch {s.batch_size}", f"grad_accum {s.grad_accum}"]
        parts.append("checkpointing" + (" + activation offload" if s.offload_activations else ""))
        if not s.gradient_checkpointing:
            parts[-1] = "no checkpointing"
        parts.append("chunked loss" if s.chunked_loss else "full-vocabulary loss")
        return ", ".join(parts)

    def sentence(self) -> str:
        """'needs 2 x 24GB GPUs with FSDP at seq 512, batch 1, ...: 21.30 GiB per rank'."""
        from .advice import gib

        size = self.budget_label or f"{gib(self.budget)} GiB"
        return (
            f"needs {self.gpus} × {size} GPUs with FSDP at {self.settings_in_words()}: "
            f"{gib(self.per_rank.total)} GiB per rank"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": self.gpus,
            "nodes": self.nodes,
            "fsdp": True,
            "budget": self.budget,
            "budget_label": self.budget_label,
            "settings": asdict(self.settings),
            "changes": list(self.changes),
            "per_rank_total": self.per_rank.total,
            "sentence": self.sentence(),
        }


def _ladder(s: RunSettings) -> list[tuple[str, dict[str, Any]]]:
    """Changes that lower activation memory without changing what is learned (but speed), in the order tried."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not s.gradient_checkpointing:
        out.append(("gradient checkpointing on", {"gradient_checkpointing": True}))
    if s.checkpoint_every > 1:
        out.append(("every layer recomputed", {"checkpoint_every": 1}))
    if not s.chunked_loss:
        out.append(("chunked loss", chunked_loss_changes(s)))
    if s.batch_size > 1:  # the same tokens per optimizer step
        out.append(
            (
                f"micro-batch {s.batch_size} -> 1 (grad_accum {s.grad_accum} -> {s.grad_accum * s.batch_size})",
                {"batch_size": 1, "grad_accum": s.grad_accum * s.batch_size},
            )
        )
    every = {"checkpoint_every": 1} if s.checkpoint_every > 1 else {}  # offload checkpoints every layer
    out.append(("activation offload", {"offload_activations": True, "gradient_checkpointing": True, **every}))
    return out


def fit_on(
    inv: Inventory, s: RunSettings, budget: int, min_seq_len: int = MIN_SEARCH_SEQ
) -> tuple[RunSettings, list[str], RankReport] | None:
    """(settings, changes in words, rank report) that fit `budget` per rank for `s`'s launch, or None.

    Tries the settings as given, then adds the `_ladder` changes one at a time (each kept only where it lowers
    the total), then the longest sequence from `min_seq_len` up that fits (rounded down to 64 tokens)."""
    current, changes = s, []
    rank = rank_report(inv, current)
    if rank.fits(budget):
        return current, changes, rank
    for words, change in _ladder(s):
        trial = replace(current, **change)
        if all(getattr(current, k) == v for k, v in change.items()):
            continue
        trial_rank = rank_report(inv, trial)
        if trial_rank.total >= rank.total:
            continue  # it does not help here
        current, rank = trial, trial_rank
        changes.append(words)
        if rank.fits(budget):
            return current, changes, rank
    low = min(min_seq_len, current.seq_len)

    def fits(n: int) -> bool:
        return rank_report(inv, replace(current, seq_len=n)).fits(budget)

    longest = largest_fitting(fits, low, current.seq_len - 1)
    if longest < low:
        return None
    rounded = longest // SEQ_STEP * SEQ_STEP
    seq = rounded if rounded >= low else longest
    changes.append(f"seq {current.seq_len} -> {seq}")
    current = replace(current, seq_len=seq)
    return current, changes, rank_report(inv, current)


def gpus_needed(
    inv: Inventory,
    s: RunSettings,
    budget: int,
    budget_label: str | None = None,
    gpus_per_node: int = GPUS_PER_NODE,
    min_seq_len: int = MIN_SEARCH_SEQ,
) -> GpuPlan | None:
    """The fewest GPUs of `budget` bytes each on which `s` (under FSDP) fits per rank, with the settings that make it
    fit (`fit_on`); None when a whole node of `gpus_per_node` is not enough.

    FSDP shards within a node and replicates across nodes (HSDP), so a rank's memory depends on the GPUs per
    node only: more nodes add throughput, not room, and the search ends at one full node."""
    s = replace(s, fsdp=True, nodes=1, gpus=1, checkpoint_every=1)  # FSDP recomputes every layer
    if s.bits != 4:
        raise ConfigError(
            "fsdp shards 4-bit bases only (bitsandbytes' 8-bit layers cannot be sharded); use bits 4 to find how "
            "many GPUs the model needs."
        )
    for n in range(1, gpus_per_node + 1):
        found = fit_on(inv, replace(s, gpus=n), budget, min_seq_len)
        if found is not None:
            settings, changes, rank = found
            return GpuPlan(n, 1, budget, budget_label, settings, changes, rank)
    return None
