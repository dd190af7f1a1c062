"""The one training step, used by the trainer, the demo, `tools/bench.py`, `tools/measure_memory.py` and the
tests: forward under bf16 autocast with the chunked loss, backward, fp32 accumulation over micro-batches,
gradient clipping, the optimizer update. Also the eval pass over a dataset with the same loss.

The loss normaliser is the step's total count of loss-carrying tokens over all micro-batches, applied inside
the loss to the fp32 logit gradients, so the accumulated gradient is exactly that of one token-weighted mean
however the tokens fall into micro-batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..data.batching import collate, target_count
from ..errors import TrainingError
from .loss import DEFAULT_CHUNK_TOKENS, causal_lm_loss
from .optim import AdapterOptimizer

if TYPE_CHECKING:
    from ..data.encode import TokenizedDataset


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float  # token-weighted mean loss over the step's micro-batches
    grad_norm: float  # total fp32 gradient norm before clipping
    tokens: int  # tokens that are not padding
    targets: int  # tokens that carried loss


class NonFiniteStepError(TrainingError):
    """The loss or gradient norm of a step was not finite; the step was not applied."""

    def __init__(self, loss: float, grad_norm: float):
        self.loss, self.grad_norm = loss, grad_norm
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        super().__init__(f"the {what}, so training stopped before applying this step")


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast where the device has it (CUDA with bf16 support, or the CPU); otherwise a no-op."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_loss_sum(
    model: torch.nn.Module,
    batch: dict,
    device: torch.device,
    bf16: bool = True,
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    normalizer: float = 1.0,
) -> torch.Tensor:
    """fp32 next-token cross-entropy of one micro-batch summed over targets and divided by `normalizer`.

    With `loss_chunk_tokens` > 0, `lm_head` + cross-entropy run chunk by chunk (`loss.causal_lm_loss`) and the
    full-vocabulary logits never exist; 0 computes transformers' full logits first. A packed batch's
    `position_ids` go through too, so its records attend only to themselves.
    """
    positions = batch.get("position_ids")
    with autocast_context(device, bf16):
        return causal_lm_loss(
            model,
            batch["input_ids"].to(device),
            batch["labels"].to(device),
            batch["attention_mask"].to(device),
            chunk_size=loss_chunk_tokens,
            normalizer=normalizer,
            position_ids=None if positions is None else positions.to(device),
        )


def _accumulate(
    model: torch.nn.Module,
    batches: Iterable[dict],
    optimizer: AdapterOptimizer,
    device: torch.device,
    bf16: bool,
    loss_chunk_tokens: int,
    targets: int,
) -> tuple[float, int, int]:
    """Forward and backward each micro-batch as it comes; return (step loss, tokens, targets seen)."""
    step_loss = torch.zeros((), dtype=torch.float32, device=device)
    tokens = seen = 0
    for batch in batches:
        loss = forward_loss_sum(model, batch, device, bf16, loss_chunk_tokens, normalizer=float(targets))
        loss.backward()
        optimizer.accumulate_grads()
        step_loss += loss.detach()
        tokens += int(batch["attention_mask"].sum())
        seen += target_count(batch["labels"])
    return float(step_loss), tokens, seen  # one device sync per step


def _with_targets(batches: Iterable[dict], targets: int | None) -> tuple[Iterable[dict], int]:
    """The micro-batches and the step's target count: given, or counted (which needs them all at hand)."""
    if targets is not None:
        return batches, targets
    batches = list(batches)
    return batches, sum(target_count(b["labels"]) for b in batches)


def accumulate_gradients(
    model: torch.nn.Module,
    batches: Iterable[dict],
    optimizer: AdapterOptimizer,
    device: torch.device,
    bf16: bool = True,
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    targets: int | None = None,
) -> float:
    """Forward and backward each micro-batch; leave fp32 gradients on the optimizer's masters; return the step loss.

    With `targets` (the step's count of loss-carrying tokens: over its examples, the labels after the first that
    are not -100) the micro-batches may be a generator: each is built, used and dropped before the next one.
    """
    batches, targets = _with_targets(batches, targets)
    return _accumulate(model, batches, optimizer, device, bf16, loss_chunk_tokens, targets)[0]


def train_step(
    model: torch.nn.Module,
    optimizer: AdapterOptimizer,
    batches: Iterable[dict],
    device: torch.device,
    *,
    bf16: bool = True,
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    max_grad_norm: float = 1.0,
    lr: float | None = None,
    before_update: Callable[[], None] | None = None,
    targets: int | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    world_targets: int | None = None,
) -> StepResult:
    """One optimizer step over `batches` (the step's micro-batches, dicts from `data.batching.collate`).

    Sets `lr` on the optimizer when given, accumulates the gradients, calls `before_update` (a test hook),
    clips to `max_grad_norm` (0: no clipping) and applies the update. `targets`, the step's total count of
    loss-carrying tokens, lets `batches` be a generator that builds each micro-batch only when it is used.
    Data parallel: `all_reduce` sums a tensor over the ranks, `targets` is this rank's count and `world_targets`
    the count of all ranks' micro-batches, which is the loss normaliser; the fp32 master gradients and the loss are
    summed over the ranks once, before clipping, so every rank applies the same update.
    Raises `TrainingError` for a learning rate that is not a finite positive number, and
    `NonFiniteStepError`, without changing the weights, when the loss or the gradient norm is not finite.
    """
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise TrainingError(f"the learning rate is {lr!r}; it must be a finite positive number such as 2e-4.")
        for group in optimizer.param_groups:
            group["lr"] = lr
    batches, targets = _with_targets(batches, targets)
    normalizer = targets if world_targets is None else world_targets
    loss, tokens, seen = _accumulate(model, batches, optimizer, device, bf16, loss_chunk_tokens, normalizer)
    if all_reduce is not None:  # before the check below, so no rank leaves another waiting in the collective
        (loss,) = optimizer.sum_grads(all_reduce, loss)
    if seen != targets:
        optimizer.zero_grad()
        raise TrainingError(
            f"the micro-batches hold {seen} target tokens but the step was normalised by {targets}; "
            "pass the step's own target count."
        )
    if before_update is not None:
        before_update()
    grad_norm = optimizer.clip_grad_norm_(max_grad_norm) if math.isfinite(loss) else float("nan")
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad()
        raise NonFiniteStepError(loss, grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return StepResult(loss=loss, grad_norm=grad_norm, tokens=tokens, targets=seen)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: TokenizedDataset,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    bf16: bool = True,
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    *,
    rank: int = 0,
    ranks: int = 1,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> tuple[float, int]:
    """(token-weighted mean loss, number of target tokens) over a dataset, in order, in eval mode.

    Over several ranks, rank r takes batches r, r + ranks, ... and `all_reduce` sums the loss and the count.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(rank * batch_size, len(dataset), batch_size * ranks):
            batch = collate(dataset.examples[start : start + batch_size], pad_token_id)
            total += float(forward_loss_sum(model, batch, device, bf16, loss_chunk_tokens))
            count += target_count(batch["labels"])
    finally:
        model.train(was_training)
    if all_reduce is not None:
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        all_reduce(sums)
        total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1), count
