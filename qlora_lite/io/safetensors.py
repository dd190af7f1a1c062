"""safetensors read one tensor at a time, and weight-file discovery that refuses pickles.

Plain reads, no mmap, so untouched pages never count against resident memory; dtype is converted chunk by
chunk, so a float32 checkpoint never needs a whole float32 copy of a tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ..errors import ModelLoadError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
READ_CHUNK_BYTES = 32 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SafetensorsFile:
    """The header of one .safetensors file, and reads of single tensors from it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > 100 * 2**20 or header_len > self.path.stat().st_size - 8:
                    raise ValueError(f"header length {header_len} does not fit the file")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                f"{self.path} is not a readable safetensors file ({exc}); re-save or re-download it."
            ) from None
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, dict] = header
        for name, info in header.items():
            if info.get("dtype") not in SAFETENSORS_DTYPES or "data_offsets" not in info or "shape" not in info:
                raise ModelLoadError(f"{self.path} has a malformed entry for tensor {name!r}; re-save the checkpoint.")

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into CPU memory, converted to `dtype` chunk by chunk if it differs."""
        info = self.entries[name]
        src_dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        dst_dtype = dtype or src_dtype
        out = torch.empty(shape, dtype=dst_dtype)
        numel = out.numel()
        elem = torch.empty((), dtype=src_dtype).element_size()
        if (end - start) != numel * elem:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has {end - start} bytes for shape {list(shape)}; the file is corrupted."
            )
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + start)
            if dst_dtype == src_dtype:
                _read_exact(f, out.view(-1).view(torch.uint8) if numel else out, end - start, self.path)
                return out
            flat = out.view(-1)
            per_chunk = max(1, READ_CHUNK_BYTES // elem)
            buffer = torch.empty(min(numel, per_chunk) * elem, dtype=torch.uint8)
            for first in range(0, numel, per_chunk):
                count = min(per_chunk, numel - first)
                chunk = buffer[: count * elem]
                _read_exact(f, chunk, count * elem, self.path)
                flat[first : first + count].copy_(chunk.view(src_dtype))
        return out


def _read_exact(f, dest: torch.Tensor, nbytes: int, path: Path) -> None:
    if nbytes == 0:
        return
    view = memoryview(dest.numpy()).cast("B")
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:nbytes])
        if not n:
            raise ModelLoadError(f"{path} ends early; the file is truncated, re-save or re-download it.")
        got += n


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model dir, in index order; refuses pickle-only checkpoints."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({exc}); re-save the model.") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelLoadError(
                f"{index} lists {missing[0]}, which is not in {model_dir}; download the missing shard."
            )
        return [model_dir / n for n in names]
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{model_dir} holds only pickle weights ({pickles[0]}), which qlora-lite does not load because unpickling "
            "can run arbitrary code; convert them once with "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` in a trusted environment."
        )
    raise ModelLoadError(f"{model_dir} has no *.safetensors weight files; point to a Hugging Face model directory.")


def largest_tensor_numel(model_dir: str | Path) -> int:
    """Element count of the largest tensor among a model dir's safetensors shards (headers only)."""
    largest = 0
    for path in weight_files(Path(model_dir)):
        st = SafetensorsFile(path)
        for key in st.keys():
            largest = max(largest, math.prod(st.shape(key)))
    return largest
