"""Batching tokenized examples: padding, collation into tensors, target counting and the seeded batch order."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # typing only: encode imports IGNORE_INDEX from here
    from .encode import Example

IGNORE_INDEX = -100


def pad_id(tokenizer) -> int:
    """The id used for padding: pad, else EOS, else 0 (padding is masked, so its value never matters)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding).

    When any example is packed (carries `position_ids`), the batch also holds `position_ids`: each record's
    positions restart at 0, an unpacked example counts 0..n-1 and the padding counts on from 0 as a segment of
    its own, so the forward's block-diagonal attention keeps records, and padding, apart.
    """
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    packed = any(getattr(e, "position_ids", None) is not None for e in examples)
    positions = torch.zeros((len(examples), width), dtype=torch.long) if packed else None
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
        if positions is not None:
            own = e.position_ids if e.position_ids is not None else range(n)
            positions[row, :n] = torch.tensor(list(own))
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if positions is not None:
        batch["position_ids"] = positions
    return batch


def target_count(labels: torch.Tensor) -> int:
    """How many positions a causal-LM loss is taken on (labels shifted by one, -100 skipped)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class BatchOrder:
    """The micro-batch order: epoch e visits the examples in a permutation seeded by (seed, e).

    The position (epoch, batch index) is all that has to be saved to continue the exact same order.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        self.n = n_examples
        self.size = micro_batch_size
        self.seed = seed
        self.epoch = epoch
        self.index = index
        self.batches_per_epoch = math.ceil(n_examples / micro_batch_size)
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=gen).tolist()
        return self._perm

    def next_indices(self) -> list[int]:
        """Example indices of the next micro-batch (the last one of an epoch may be smaller)."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        start = self.index * self.size
        self.index += 1
        return self._permutation()[start : start + self.size]

    @property
    def epochs_done(self) -> float:
        """Fractional epochs consumed so far."""
        return self.epoch + min(self.index * self.size, self.n) / self.n

    def state(self) -> dict:
        """The position to save in a checkpoint."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "n_examples": self.n,
            "micro_batch_size": self.size,
            "seed": self.seed,
        }
