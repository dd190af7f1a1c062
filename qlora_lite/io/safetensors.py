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
from .json_files import expect_object, json_kind, read_json_object, shown

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
SAFETENSORS_DTYPES.update(
    {name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
     if hasattr(torch, attr)}
)  # fmt: skip
READ_CHUNK_BYTES = 32 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SafetensorsFile:
    """The header of one .safetensors file, and reads of single tensors from it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            file_size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > 100 * 2**20 or header_len > file_size - 8:
                    raise ValueError(f"header length {header_len} does not fit the file")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                f"{self.path} is not a readable safetensors file ({exc}); re-save or re-download it."
            ) from None
        self.data_start = 8 + header_len
        self.metadata, self.entries = _checked_header(self.path, header, file_size - self.data_start)

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
        start, end = info["data_offsets"]  # checked against shape, dtype and file size by _checked_header
        dst_dtype = dtype or src_dtype
        out = torch.empty(shape, dtype=dst_dtype)
        numel = out.numel()
        elem = _element_size(src_dtype)
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


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_header(path: Path, header: object, data_size: int) -> tuple[dict, dict[str, dict]]:
    """(metadata, tensor entries) of a parsed header, refused in one sentence where the safetensors library
    would refuse it: wrong shapes of JSON, unknown dtypes, sizes that disagree, offsets that overlap, leave
    gaps or point beyond the file."""

    def malformed(detail: str) -> ModelLoadError:
        return ModelLoadError(f"{path} has a malformed safetensors header ({detail}); re-save or re-download the file.")

    if not isinstance(header, dict):
        raise malformed(f"{json_kind(header)} where an object of tensors must be")
    metadata = header.pop("__metadata__", {})
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise malformed(f"__metadata__ is {shown(metadata)}, not an object of strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise malformed(f"tensor {name!r} is {json_kind(info)}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise malformed(
                f"tensor {name!r} has dtype {shown(dtype)}, which is not one of {', '.join(SAFETENSORS_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise malformed(f"tensor {name!r} has shape {shown(shape)}, not a list of non-negative whole numbers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)) or (
            offsets[0] > offsets[1]
        ):
            raise malformed(
                f"tensor {name!r} has data_offsets {shown(offsets)}, not [begin, end] with 0 <= begin <= end"
            )
        nbytes = math.prod(shape) * _element_size(SAFETENSORS_DTYPES[dtype])
        if offsets[1] - offsets[0] != nbytes:
            raise malformed(
                f"tensor {name!r} has {offsets[1] - offsets[0]} bytes for {dtype} shape {shape}, which needs {nbytes}"
            )
        spans.append((offsets[0], offsets[1], name))
    covered, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise malformed(f"tensor {name!r} at data_offsets [{begin}, {end}] overlaps tensor {previous!r}")
        if begin > covered:
            raise malformed(
                f"{begin - covered} unused bytes lie before tensor {name!r} at data_offsets [{begin}, {end}]"
            )
        covered, previous = end, name
    if covered > data_size:
        raise ModelLoadError(f"{path} ends early; the file is truncated, re-save or re-download it.")
    if covered < data_size:
        raise malformed(f"{data_size - covered} bytes follow the last tensor")
    return metadata, header


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


def _index_shards(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json lists, in order, each checked to be a plain file name."""
    fix = "re-save the model or re-download the index"
    data = read_json_object(index, "a safetensors index", fix=fix)
    weight_map = expect_object(data, "weight_map", index, required=True, fix=fix)
    if not weight_map:
        raise ModelLoadError(f'{index}: "weight_map" lists no tensors; {fix}.')
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise ModelLoadError(
                f'{index}: "weight_map" maps {tensor!r} to {shown(shard)} ({json_kind(shard)}), '
                f"not to the file name of a shard beside the index; {fix}."
            )
    return list(dict.fromkeys(weight_map.values()))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model dir, in index order; refuses pickle-only checkpoints."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = _index_shards(index)
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
