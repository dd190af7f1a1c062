"""The run's length, the notices about it (warmup, a step longer than the data, a launch's global batch) and its
learning-rate schedule: a pure function of the step, so a resumed run continues it
exactly."""

from __future__ import annotations

import math
from fractions import Fraction

from ..config.settings import TrainSettings


def run_steps(s: TrainSettings, micro_batches_per_epoch: int, ranks: int = 1) -> int:
    """The optimizer steps a run takes: `train.max_steps`, or with `train.epochs`
    ceil(epochs x micro-batches per epoch / (grad_accum x ranks)), at least 1 (each of `ranks` data-parallel ranks
    takes `grad_accum` micro-batches per step).

    The product is taken on the decimal value of `epochs` (0.1 is one tenth, not 0.1000000000000000055), so a
    round number of micro-batches is not rounded up to one step more.
    """
    if s.max_steps > 0:
        return s.max_steps
    micro_batches = Fraction(repr(float(s.epochs))) * micro_batches_per_epoch
    return max(1, math.ceil(micro_batches / (s.grad_accum * ranks)))


def warmup_for(s: TrainSettings, steps: int) -> int:
    """The warmup a run of `steps` steps uses: `train.warmup_steps`, clipped to the run's length when it is longer
    (the learning rate then reaches `train.lr` at the last step instead of never)."""
    return min(s.warmup_steps, steps)


def warmup_notice(s: TrainSettings, steps: int) -> list[str]:
    """The start notice for a warmup that `warmup_for` clipped (none when it fits the run)."""
    if s.warmup_steps <= steps:
        return []
    return [
        f"train.warmup_steps is {s.warmup_steps} but the run has {steps} step{'s' if steps > 1 else ''}, so the "
        f"learning rate would never reach train.lr; the warmup is clipped to the run's {steps} steps, reaching "
        f"train.lr at the last; set train.warmup_steps below {steps} for steps at the full learning rate"
    ]


def lr_at(step: int, s: TrainSettings, steps: int | None = None) -> float:
    """Learning rate of optimizer step `step` (1-based) in a run of `steps` steps (default `train.max_steps`):
    linear warmup to `lr` over `warmup_for(s, steps)` steps, then cosine to 0 or constant.

    The cosine is evaluated at (step - warmup - 1) / (steps - warmup), so no step runs at lr 0.
    """
    steps = s.max_steps if steps is None else steps
    warmup = warmup_for(s, steps)
    if warmup and step <= warmup:
        return s.lr * step / warmup
    if s.schedule == "constant":
        return s.lr
    progress = (step - warmup - 1) / max(1, steps - warmup)
    return s.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def world_notices(s: TrainSettings, ranks: int, nodes: int) -> list[str]:
    """What a torchrun launch of `ranks` ranks does, said at the start: how it splits the work and the global batch."""
    if ranks <= 1:
        return []
    where = f" on {nodes} nodes" if nodes > 1 else ""
    mode = "data parallel"
    if s.fsdp:
        mode = "base and adapters sharded over the GPUs of each node (FSDP2" + (
            ", replicated across nodes)" if nodes > 1 else ")"
        )
    return [
        f"{ranks} ranks{where}, {mode}: each optimizer step takes train.micro_batch_size {s.micro_batch_size}"
        f" x train.grad_accum {s.grad_accum} x {ranks} ranks = {s.micro_batch_size * s.grad_accum * ranks} "
        "sequences, its loss averaged over the loss-carrying tokens of all ranks; rank 0 writes the run directory"
    ]


def data_notices(s: TrainSettings, n: int, per_epoch: int, ranks: int = 1) -> list[str]:
    """A step that asks for more than the `n` training sequences hold is said (not refused): it repeats sequences
    within a step. `per_epoch` is the micro-batches of one pass; each of `ranks` ranks takes `grad_accum` a step."""
    per_step = s.grad_accum * ranks
    if per_step > per_epoch:
        step = (
            f"a step of train.grad_accum = {s.grad_accum} micro-batches"
            if ranks == 1
            else f"a step of train.grad_accum = {s.grad_accum} micro-batches on each of {ranks} ranks"
        )
        return [
            f"{step} is longer than one pass over the training "
            f"data ({per_epoch} micro-batch{'es' if per_epoch > 1 else ''} of up to {s.micro_batch_size} of its "
            f"{n} sequences), so each step goes over the data {per_step / per_epoch:.3g} times; set "
            f"train.grad_accum to {max(1, per_epoch // ranks)} or less for at most one pass per step"
        ]
    if s.micro_batch_size > n:
        return [
            f"train.micro_batch_size is {s.micro_batch_size} but the training data holds {n} sequences, so each "
            f"micro-batch is those {n} (set train.micro_batch_size to {n} or less to match)"
        ]
    return []
