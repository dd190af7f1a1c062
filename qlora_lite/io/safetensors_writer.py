"""Streaming safetensors writer: the header written up front, then each tensor produced, written and dropped."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from .atomic import atomic_file

SAFETENSORS_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


class PlannedTensor(Protocol):
    """What the writer needs to know of a tensor before it is produced: its key, dtype, shape and size."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=PlannedTensor)


def write_safetensors_streaming(path: Path, items: Sequence[T], produce: Callable[[T], torch.Tensor]) -> None:
    """Write a safetensors file whose header is known up front, producing one tensor at a time."""
    from .heap import malloc_trim

    release_freed = malloc_trim()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        header[item.key] = {
            "dtype": SAFETENSORS_CODES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for item in items:
            tensor = produce(item)
            if tensor.dtype != item.dtype or tuple(tensor.shape) != tuple(item.shape):
                raise AssertionError(
                    f"{item.key}: produced {tensor.dtype} {list(tensor.shape)}, planned {item.dtype} {list(item.shape)}"
                )
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
            del tensor
            # glibc keeps freed mid-sized temporaries; without this, resident memory creeps up by several tensors
            release_freed()


__all__ = ["SAFETENSORS_CODES", "PlannedTensor", "write_safetensors_streaming"]
