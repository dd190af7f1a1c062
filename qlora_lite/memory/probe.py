"""Count the bytes of tensor storages that torch ops allocate, on any device (a CPU stand-in for CUDA's stats).

`AllocationTracker` is a `TorchDispatchMode`: every aten op that runs while it is active reports its
outputs; an output whose storage is new (its schema return does not alias an input) is added to the live
total, and a finalizer takes it off when the storage is freed. `current` and `peak` are therefore the
bytes of storages created inside the block that are alive now / were alive at most, which on CUDA is what
`torch.cuda.memory_allocated` counts minus the allocator's 512-byte rounding.

What it cannot see: scratch buffers that a kernel allocates and frees inside one op (cuBLAS / flash
attention workspaces, temporaries inside bitsandbytes' custom ops), and storages created before the block.
It is used by `tools/measure_memory.py --device cpu` and the tests to check the activation model on the CPU.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_ALIASED: dict = {}


def _aliased_returns(func) -> frozenset[int]:
    """Indices of the op's returns that alias an input (views, in-place results), from its schema; cached."""
    if func not in _ALIASED:
        _ALIASED[func] = frozenset(i for i, r in enumerate(func._schema.returns) if r.alias_info is not None)
    return _ALIASED[func]


def _fresh_outputs(func, out) -> list[torch.Tensor]:
    """The output tensors of `func` that do not alias one of its inputs, per the op schema."""
    aliased = _aliased_returns(func)
    if isinstance(out, torch.Tensor):
        return [] if 0 in aliased else [out]
    outs = out if isinstance(out, (tuple, list)) else (out,)
    fresh: list[torch.Tensor] = []
    for i, item in enumerate(outs):
        if i in aliased:
            continue
        if isinstance(item, torch.Tensor):
            fresh.append(item)
        elif isinstance(item, (tuple, list)):
            fresh.extend(t for t in tree_flatten(item)[0] if isinstance(t, torch.Tensor))
    return fresh


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the storages allocated by ops run inside the `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:
            return
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def reset_peak(self) -> None:
        """Start a new peak measurement from the bytes alive now."""
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in _fresh_outputs(func, out):
            self._track(tensor)
        return out


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared tables and tied weights counted once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
