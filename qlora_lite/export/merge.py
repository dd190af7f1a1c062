"""Adapters in PEFT's format, and the streamed merged fp16/bf16 export.

Adapter dir: `adapter_config.json` + `adapter_model.safetensors` with peft's key names
(`base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads it.
`adapter_config.json` carries one extra key, "qlora_lite", with the quantization the adapter was trained
against (peft ignores unknown keys); the merged export re-creates that quantization from it.

Merged export: the base checkpoint is streamed tensor by tensor. The output's shard plan (names, shapes,
offsets) is known from the safetensors headers alone, so each shard's header is written first and every
tensor is computed, written and dropped before the next one is read: resident memory stays at about one
tensor's working set, whatever the shard size.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..model import quant
from ..config.settings import QuantConfig
from ..errors import AdapterError, ConfigError, ExportError
from ..io.atomic import atomic_dir, atomic_file, remove_stale_temps, save_safetensors_atomic, write_json_atomic
from ..io.faults import fault_point
from ..io.lock import DirectoryLock
from ..io.safetensors import SafetensorsFile, weight_files
from ..model.lora import adapter_state_dict, apply_lora, lora_layers, lora_scaling

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
QLORA_KEY = "qlora_lite"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MERGE_MODES = ("dequantized", "original")
DEFAULT_MAX_SHARD_SIZE = "5GB"
INDEX_NAME = "model.safetensors.index.json"
# Rows of a merged weight computed at once in fp32: bounds the fp32 working set to ~8 MB per chunk.
CHUNK_ELEMENTS = 2 * 2**20
# Elements quantized per call: bitsandbytes' CPU quantizer needs ~20 bytes of temporaries per element.
QUANT_CHUNK_ELEMENTS = 2**18
SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
AUX_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip
SAFETENSORS_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


# ----------------------------------------------------------------------------------------- adapters
def _peft_target_modules(model: nn.Module) -> list[str] | str:
    settings = model.qlora_lora
    spec = settings.config.target_modules
    if isinstance(spec, str) and spec != "all-linear":
        return spec  # a regex: peft matches it against full module paths as we did
    return sorted({name.rsplit(".", 1)[-1] for name in settings.targets})


def _quant_record(model: nn.Module) -> dict | None:
    settings = getattr(model, "qlora_quant", None)
    if settings is None:
        return None
    return {
        "bits": settings.bits,
        "quant_type": settings.quant_type,
        "double_quant": settings.double_quant,
        "blocksize": settings.blocksize,
        "int8_threshold": settings.int8_threshold,
        "quantized_modules": list(getattr(model, "qlora_targets", []) or []),
    }


def adapter_config_dict(model: nn.Module) -> dict:
    """The `adapter_config.json` content peft expects for this model's LoRA settings, plus our quant record."""
    settings = getattr(model, "qlora_lora", None)
    if settings is None:
        raise AdapterError("this model has no LoRA adapters; call apply_lora(model, ...) first.")
    cfg = settings.config
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(getattr(model.config, "name_or_path", "") or ""),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _peft_target_modules(model),
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }
    record = _quant_record(model)
    if record is not None:
        config[QLORA_KEY] = record
    return config


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the model's LoRA adapter in PEFT's format to `out_dir` (each file written atomically)."""
    out_dir = Path(out_dir)
    config = adapter_config_dict(model)
    tensors = {PEFT_PREFIX + k: v.detach() for k, v in adapter_state_dict(model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json_atomic(out_dir / ADAPTER_CONFIG, config)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The parsed `adapter_config.json` of an adapter dir, checked to be a plain LoRA adapter."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist; give the adapter/ folder of a run (or a peft adapter dir).")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} has no {ADAPTER_CONFIG}; point to a directory written by save_adapter or peft.")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc}); re-save the adapter.") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path} describes a {config.get('peft_type')} adapter; only LoRA adapters are supported.")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path} lacks {key!r}; re-save the adapter with peft or qlora-lite.")
    if config.get("use_dora"):
        raise AdapterError(f"{path} is a DoRA adapter, which qlora-lite does not support.")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path} has fully trained modules_to_save {config['modules_to_save']}, which qlora-lite does not support; re-train without them.")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path} trains biases (bias={config['bias']!r}), which qlora-lite does not support; re-train with bias 'none'.")
    return config


def _module_key(adapter_key: str) -> str:
    """peft's file key -> `<module path>.lora_A.weight` (prefix and adapter name removed)."""
    name = adapter_key[len(PEFT_PREFIX) :] if adapter_key.startswith(PEFT_PREFIX) else adapter_key
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def _adapter_file(adapter_dir: str | Path) -> SafetensorsFile:
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{Path(adapter_dir)} has no {ADAPTER_WEIGHTS}; only safetensors adapters are loaded.")
    return SafetensorsFile(path)


def read_adapter_tensors(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed by module path (`<path>.lora_A.weight`), peft's prefix removed."""
    st = _adapter_file(adapter_dir)
    return {_module_key(key): st.read(key) for key in st.keys()}


def _stored_adapter_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    # peft saves fp32 adapters and computes them in fp32; rounding them to bf16 would move logits by ~1%.
    dtypes = {t.dtype for t in tensors.values()}
    return quant.COMPUTE_DTYPE if dtypes == {quant.COMPUTE_DTYPE} else torch.float32


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model`, applying LoRA first if the model has none.

    LoRA applied here keeps the file's precision: bf16 adapters stay bf16, fp32 (peft's default) stay fp32.
    """
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    if getattr(model, "qlora_lora", None) is None:
        if config.get("rank_pattern"):
            raise AdapterError(
                f"the adapter in {adapter_dir} gives layers their own ranks (rank_pattern), which load_adapter does not support; "
                "merge it with export_merged instead."
            )
        targets = config["target_modules"]
        apply_lora(
            model,
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=targets if isinstance(targets, str) else list(targets),
            rslora=bool(config.get("use_rslora", False)),
            adapter_dtype=_stored_adapter_dtype(tensors),
        )
    own = adapter_state_dict(model)
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise AdapterError(
            f"adapter tensor {unexpected[0]!r} has no matching LoRA layer in this model; the adapter was trained on a different base."
        )
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise AdapterError(f"the adapter in {adapter_dir} lacks {missing[0]!r}; it does not cover this model's LoRA layers.")
    for name, tensor in tensors.items():
        target = own[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise AdapterError(
                f"adapter tensor {name!r} has shape {list(tensor.shape)} but this model expects {list(target.shape)}; "
                "the adapter belongs to a different base model or rank."
            )
    _apply_patterns(model, config)
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return model


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _apply_patterns(model: nn.Module, config: dict) -> None:
    # peft adapters may give some layers their own alpha; the scaling follows the file, as in peft.
    if not config.get("alpha_pattern") and not config.get("rank_pattern"):
        return
    for name, layer in lora_layers(model).items():
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
        layer.scaling = lora_scaling(layer.r, alpha, bool(config.get("use_rslora", False)))


def adapter_quant_settings(config: dict) -> tuple[QuantConfig, bool]:
    """The quantization an adapter was trained against, and whether the adapter recorded it.

    Adapters saved by peft carry no record; they get the QLoRA defaults (4-bit NF4, double quant,
    block size 64), which are also `load_quantized`'s defaults.
    """
    record = config.get(QLORA_KEY)
    if not isinstance(record, dict):
        return QuantConfig(), False
    keys = ("bits", "quant_type", "double_quant", "blocksize", "int8_threshold")
    settings = QuantConfig(**{k: record[k] for k in keys if k in record})
    try:
        settings.validate()
    except ConfigError as exc:  # names a quant.* field; restate it as an adapter problem
        raise AdapterError(f"{ADAPTER_CONFIG} records invalid quantization settings ({exc}); re-save the adapter.") from None
    return settings, True


def adapter_quantized_modules(config: dict) -> list[str] | None:
    """The module paths that were quantized while the adapter trained, when the adapter recorded them."""
    record = config.get(QLORA_KEY)
    modules = record.get("quantized_modules") if isinstance(record, dict) else None
    return list(modules) if modules else None


# ------------------------------------------------------------------------------------ merged export
@dataclass(frozen=True)
class _Lora:
    key_a: str
    key_b: str
    scaling: float


@dataclass
class _Item:
    """One output tensor: where it comes from and what happens to it."""

    key: str
    shard: SafetensorsFile
    shape: tuple[int, ...]
    dtype: torch.dtype
    conv1d: bool = False
    dequantize: bool = False
    lora: _Lora | None = None

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class ExportPlan:
    """Everything `export_merged` decided from headers and configs, before any weight is read."""

    base_dir: Path
    adapter_dir: Path
    out_dir: Path
    dtype: torch.dtype
    merge_into: str
    quant: QuantConfig
    quant_recorded: bool
    adapter: SafetensorsFile
    config: dict
    items: list[_Item]
    shards: list[list[_Item]] = field(default_factory=list)
    replace_existing: bool = False

    @property
    def shard_names(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the directory, its shard files, their bytes, and the settings used."""

    path: Path
    shard_files: list[str]
    total_bytes: int
    merged_tensors: int
    dtype: str
    merge_into: str
    quant: QuantConfig
    quant_recorded: bool


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string such as '5GB', '500MB', '2GiB' (GB = 10^9, GiB = 2^30, like transformers)."""
    if isinstance(value, int):
        size = value
    else:
        text = str(value).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number) :]
        try:
            size = int(float(number) * SIZE_UNITS[unit])
        except (ValueError, KeyError):
            raise ExportError(f"max shard size {value!r} is not a size; write it like 5GB, 500MB or 2GiB.") from None
    if size <= 0:
        raise ExportError(f"max shard size {value!r} must be positive; write it like 5GB or 500MB.")
    return size


def _check_options(dtype: str, merge_into: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported for export; use 'float16' or 'bfloat16'.")
    if merge_into not in MERGE_MODES:
        raise ExportError(f"merge_into {merge_into!r} is unknown; use 'dequantized' (the function the adapter trained against) or 'original'.")
    return DTYPES[dtype]


def _check_out_dir(out_dir: Path, base_dir: Path, adapter_dir: Path, overwrite: bool) -> bool:
    """Refuse an output dir that would clobber data; True when an existing (empty or allowed) dir is replaced."""
    out = out_dir.resolve()
    for name, src in (("base model", base_dir), ("adapter", adapter_dir)):
        src = src.resolve()
        if out == src or out in src.parents:
            raise ExportError(f"output directory {out_dir} holds the {name} ({src}); choose a different --out.")
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} is a file; choose a directory path for --out.")
    if any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output directory {out_dir} exists and is not empty; choose another --out or pass --overwrite to replace it.")
    return True


def _lora_index(adapter: SafetensorsFile, config: dict) -> dict[str, _Lora]:
    """module path -> its adapter keys and scaling; refuses tensors that are not LoRA A/B matrices."""
    keys: dict[str, dict[str, str]] = {}
    for key in adapter.keys():
        name = _module_key(key)
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                keys.setdefault(name[: -len(suffix)], {})[part] = key
                break
        else:
            raise AdapterError(
                f"adapter tensor {key!r} is not a LoRA A/B matrix (embedding LoRA, biases and modules_to_save are not supported); re-train a plain LoRA adapter."
            )
    index = {}
    for module, pair in keys.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise AdapterError(f"the adapter has no {module}.{missing}.weight for its other half; re-save the adapter.")
        for key in pair.values():
            if len(adapter.shape(key)) != 2:
                raise AdapterError(f"adapter tensor {key!r} has shape {list(adapter.shape(key))}, not a matrix; re-save the adapter.")
        r = adapter.shape(pair["lora_A"])[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        index[module] = _Lora(pair["lora_A"], pair["lora_B"], lora_scaling(r, alpha, bool(config.get("use_rslora", False))))
    if not index:
        raise AdapterError(f"{adapter.path} holds no LoRA tensors; re-save the adapter.")
    return index


def _check_lora_shapes(item: _Item, lora: _Lora, adapter: SafetensorsFile) -> None:
    out_f, in_f = (item.shape[1], item.shape[0]) if item.conv1d else item.shape
    shape_a, shape_b = adapter.shape(lora.key_a), adapter.shape(lora.key_b)
    layout = "[in, out]" if item.conv1d else "[out, in]"
    for key, shape, ok in (
        (lora.key_a, shape_a, len(shape_a) == 2 and shape_a[1] == in_f),
        (lora.key_b, shape_b, len(shape_b) == 2 and shape_b[0] == out_f and shape_b[1] == shape_a[0]),
    ):
        if not ok:
            raise AdapterError(
                f"adapter tensor {key!r} has shape {list(shape)} but the base weight {item.key!r} is {list(item.shape)} "
                f"({layout}, so lora_A must be [r, {in_f}] and lora_B [{out_f}, r]); the adapter belongs to a different base model."
            )


def _base_items(base_dir: Path, shards: list[SafetensorsFile], out_dtype: torch.dtype, trust_remote_code: bool):
    """Output items for every checkpoint tensor, with the checkpoint key -> model path map and Conv1D flags."""
    from ..model.loader import checkpoint_key_map, is_conv1d, build_skeleton, load_config

    skeleton = build_skeleton(load_config(base_dir, trust_remote_code), trust_remote_code)
    items, paths, seen = [], {}, set()
    for shard in shards:
        key_map = checkpoint_key_map(skeleton, shard.keys())
        for key in shard.keys():
            if key in seen:
                continue
            seen.add(key)
            dtype = out_dtype if shard.dtype(key).is_floating_point else shard.dtype(key)
            item = _Item(key, shard, shard.shape(key), dtype)
            name = key_map.get(key)
            if name is not None and name.endswith(".weight"):
                module_path = name[: -len(".weight")]
                paths[module_path] = item
                item.conv1d = is_conv1d(skeleton.get_submodule(module_path))
            items.append(item)
    return items, paths


def _assign_shards(items: list[_Item], max_bytes: int) -> list[list[_Item]]:
    """Greedy split in checkpoint order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def plan_export(
    base_path: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float16",
    merge_into: str = "dequantized",
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ExportPlan:
    """Check every input and decide the output layout from headers alone; raises before anything is written."""
    from ..model.loader import check_model_dir

    out_dtype = _check_options(dtype, merge_into)
    max_bytes = parse_size(max_shard_size)
    base_dir = check_model_dir(base_path)
    shards = [SafetensorsFile(p) for p in weight_files(base_dir)]
    config = read_adapter_config(adapter_dir)
    adapter = _adapter_file(adapter_dir)
    loras = _lora_index(adapter, config)
    settings, recorded = adapter_quant_settings(config)
    replace = _check_out_dir(Path(out_dir), base_dir, Path(adapter_dir), overwrite)

    items, by_path = _base_items(base_dir, shards, out_dtype, trust_remote_code)
    for module, lora in loras.items():
        item = by_path.get(module)
        if item is None or len(item.shape) != 2 or not item.shape[0]:
            raise AdapterError(
                f"adapter tensor {lora.key_a!r} targets {module}, which has no 2-D weight in {base_dir}; the adapter belongs to a different base model."
            )
        _check_lora_shapes(item, lora, adapter)
        item.lora = lora
    if merge_into == "dequantized":
        quantized = adapter_quantized_modules(config) or list(loras)
        for module in quantized:
            if module in by_path and len(by_path[module].shape) == 2:
                by_path[module].dequantize = True

    model_config = json.loads((base_dir / "config.json").read_text())
    plan = ExportPlan(base_dir, Path(adapter_dir), Path(out_dir), out_dtype, merge_into, settings, recorded, adapter, model_config, items)
    plan.shards = _assign_shards(items, max_bytes)
    plan.replace_existing = replace
    return plan


def quantize_4bit_chunked(
    weight: torch.Tensor, settings: QuantConfig, chunk_elements: int = QUANT_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, "quant.bnbf.QuantState"]:
    """`quant.quantize_4bit` computed a block-aligned chunk at a time: the same packed bytes and QuantState.

    bitsandbytes' CPU quantizer allocates about 20 bytes per element in fp32/int32 temporaries; blocks are
    independent, so chunking its op bounds that to the chunk. The double quantization of the absmax vector
    (n / blocksize floats) runs on the whole vector, exactly as `bnbf.quantize_4bit` does it.
    """
    bnbf, blocksize = quant.bnbf, settings.blocksize
    w = weight.to(quant.COMPUTE_DTYPE).contiguous().reshape(-1)
    step = max(blocksize, chunk_elements // blocksize * blocksize)
    packed_parts, absmax_parts = [], []
    for start in range(0, w.numel(), step):
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w[start : start + step], blocksize, settings.quant_type, torch.uint8)
        packed_parts.append(packed)
        absmax_parts.append(absmax)
    packed, absmax = torch.cat(packed_parts), torch.cat(absmax_parts)
    del packed_parts, absmax_parts
    code = bnbf.get_4bit_type(settings.quant_type, device=w.device)
    common = dict(shape=weight.shape, dtype=quant.COMPUTE_DTYPE, blocksize=blocksize, code=code, quant_type=settings.quant_type)
    if not settings.double_quant:
        return packed, bnbf.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=quant.NESTED_BLOCKSIZE)
    return packed, bnbf.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def _dequantized_rows(weight: torch.Tensor, settings: QuantConfig, device: torch.device) -> Callable[[slice], torch.Tensor]:
    """Rows of deq(quantize(weight)) in fp32, bit-identical to what the loaded quantized layer multiplies by."""
    weight = weight.to(device)
    if settings.bits == 8:
        # LLM.int8 scales each row on its own, so quantizing a block of rows at a time is exact
        def rows_8bit(rows: slice) -> torch.Tensor:
            codes, scales = quant.quantize_8bit(weight[rows])
            return (codes.float() * (scales.float().unsqueeze(1) / 127.0)).cpu()

        return rows_8bit
    packed, state = quantize_4bit_chunked(weight, settings)
    del weight
    # bf16, like Linear4bit's forward: dequantize_4bit(...) then the compute dtype
    deq = quant.bnbf.dequantize_4bit(packed, state)
    del packed
    return lambda rows: deq[rows].float().cpu()


def _extremes(values: torch.Tensor) -> tuple[float, float]:
    # aminmax reduces without a tensor-sized temporary (isinf / abs would allocate one); NaN propagates
    if not values.numel():
        return 0.0, 0.0
    lo, hi = torch.aminmax(values)
    return lo.item(), hi.item()


def _check_range(values: torch.Tensor, key: str, dtype: torch.dtype) -> None:
    lo, hi = _extremes(values)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ExportError(f"merged tensor {key!r} has NaN or infinite values; the adapter (or base weight) is broken, re-train or re-save it.")
    peak = max(-lo, hi)
    if dtype == torch.float16 and peak > torch.finfo(torch.float16).max:
        raise ExportError(
            f"merged tensor {key!r} reaches {peak:.4g}, beyond float16's range (65504); export with dtype bfloat16 (--dtype bfloat16)."
        )


def _merged_tensor(item: _Item, plan: ExportPlan, device: torch.device) -> torch.Tensor:
    """deq(W_q) (or W) + scaling·B·A in fp32, cast to the output dtype, in the checkpoint's own layout."""
    if plan.merge_into == "dequantized" and item.dequantize:
        weight = item.shard.read(item.key, quant.COMPUTE_DTYPE)
        rows_of = _dequantized_rows(weight.t() if item.conv1d else weight, plan.quant, device)
    else:
        weight = item.shard.read(item.key)
        view = weight.t() if item.conv1d else weight
        rows_of = lambda rows: view[rows].float()  # noqa: E731
    del weight
    out = torch.empty(item.shape, dtype=plan.dtype)
    dest = out.t() if item.conv1d else out  # [out, in] view onto the stored layout
    out_f, in_f = dest.shape
    lora = item.lora
    a = plan.adapter.read(lora.key_a, torch.float32) if lora else None
    b = plan.adapter.read(lora.key_b, torch.float32) if lora else None
    step = max(1, CHUNK_ELEMENTS // max(in_f, 1))
    for start in range(0, out_f, step):
        rows = slice(start, min(start + step, out_f))
        merged = rows_of(rows)
        if lora is not None:
            merged.addmm_(b[rows], a, alpha=lora.scaling)
        _check_range(merged, item.key, plan.dtype)
        dest[rows].copy_(merged)
    return out


def _count_inf(tensor: torch.Tensor) -> int:
    flat = tensor.reshape(-1)
    return sum(int(torch.isinf(flat[i : i + CHUNK_ELEMENTS]).sum()) for i in range(0, flat.numel(), CHUNK_ELEMENTS))


def _copied_tensor(item: _Item) -> torch.Tensor:
    """An untargeted tensor cast to the output dtype; refuses values the cast turns into infinity."""
    tensor = item.shard.read(item.key, item.dtype)
    if item.dtype == torch.float16 and math.inf in (abs(v) for v in _extremes(tensor)):
        if _count_inf(tensor) != _count_inf(item.shard.read(item.key)):  # not infinities the checkpoint already had
            raise ExportError(
                f"tensor {item.key!r} holds values beyond float16's range (65504); export with dtype bfloat16 (--dtype bfloat16)."
            )
    return tensor


def _write_safetensors_streaming(path: Path, items: list[_Item], produce: Callable[[_Item], torch.Tensor]) -> None:
    """Write a safetensors file whose header is known up front, producing one tensor at a time."""
    from ..model.loader import malloc_trim

    release_freed = malloc_trim()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        header[item.key] = {"dtype": SAFETENSORS_CODES[item.dtype], "shape": list(item.shape), "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for item in items:
            tensor = produce(item)
            if tensor.dtype != item.dtype or tuple(tensor.shape) != tuple(item.shape):
                raise AssertionError(f"{item.key}: produced {tensor.dtype} {list(tensor.shape)}, planned {item.dtype} {list(item.shape)}")
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
            del tensor
            # glibc keeps freed mid-sized temporaries; without this, resident memory creeps up by several tensors
            release_freed()


def merged_config(config: dict, dtype: torch.dtype) -> dict:
    """config.json for the merged model: no quantization settings, the output dtype named."""
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "_pre_quantization_dtype")}
    name = "float16" if dtype == torch.float16 else "bfloat16"
    out["dtype"] = name
    if "torch_dtype" in out:
        out["torch_dtype"] = name
    return out


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, atomic_file(dst) as fout:
        shutil.copyfileobj(fin, fout, 2**20)


def _write_output(plan: ExportPlan, tmp: Path, device: torch.device) -> None:
    written = 0

    def produce(item: _Item) -> torch.Tensor:
        nonlocal written
        fault_point("in-export", written)  # `written` tensors are already in the output (crash tests)
        written += 1
        if item.lora is not None or item.dequantize:
            return _merged_tensor(item, plan, device)
        return _copied_tensor(item)

    names = plan.shard_names
    for name, items in zip(names, plan.shards):
        _write_safetensors_streaming(tmp / name, items, produce)
    if len(names) > 1:
        weight_map = {item.key: name for name, items in zip(names, plan.shards) for item in items}
        total = sum(item.nbytes for item in plan.items)
        write_json_atomic(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json_atomic(tmp / "config.json", merged_config(plan.config, plan.dtype))
    for aux in AUX_FILES:
        if (plan.base_dir / aux).is_file():
            _copy_file(plan.base_dir / aux, tmp / aux)


def run_export(
    base_path: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float16",
    merge_into: str = "dequantized",
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> ExportResult:
    """`export_merged` returning what it wrote (shards, bytes, quantization settings used)."""
    plan = plan_export(
        base_path, adapter_dir, out_dir, dtype, merge_into,
        max_shard_size=max_shard_size, overwrite=overwrite, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    # Quantize where training did (CUDA when present), so the bytes match the trained model's.
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # One export per output dir. The lock file sits beside the dir, which is renamed into place whole.
    with DirectoryLock(plan.out_dir, purpose="qlora-lite export", beside=True):
        replace = _check_out_dir(plan.out_dir, plan.base_dir, plan.adapter_dir, overwrite)  # again, now that we hold it
        remove_stale_temps(plan.out_dir)  # half-written outputs of killed exports
        try:
            with torch.no_grad(), atomic_dir(plan.out_dir, overwrite=replace) as tmp:
                _write_output(plan, tmp, device)
        except OSError as exc:
            raise ExportError(
                f"writing the merged model to {plan.out_dir} failed ({exc}); nothing was changed there, "
                "free disk space or fix permissions and export again."
            ) from None
    return ExportResult(
        path=plan.out_dir,
        shard_files=plan.shard_names,
        total_bytes=sum(item.nbytes for item in plan.items),
        merged_tensors=sum(1 for item in plan.items if item.lora is not None),
        dtype=dtype,
        merge_into=merge_into,
        quant=plan.quant,
        quant_recorded=plan.quant_recorded,
    )


def export_merged(
    base_path: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float16",
    merge_into: str = "dequantized",
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge a LoRA adapter into its base and write a plain fp16/bf16 Hugging Face model dir; returns its path.

    Each targeted weight becomes `deq(quantize(W)) + scaling·B·A` (merge_into="dequantized": the weights the
    adapter was trained against) or `W + scaling·B·A` (merge_into="original"), computed in fp32 and cast to
    `dtype`. Other tensors are cast and copied. The base is streamed one tensor at a time, the output is
    sharded past `max_shard_size`, and `out_dir` appears only when complete (`overwrite` replaces a non-empty one).
    """
    return run_export(
        base_path, adapter_dir, out_dir, dtype, merge_into,
        max_shard_size=max_shard_size, overwrite=overwrite, device=device, trust_remote_code=trust_remote_code,
    ).path  # fmt: skip


__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
    "read_adapter_tensors",
    "adapter_config_dict",
    "adapter_quant_settings",
    "export_merged",
    "run_export",
    "plan_export",
    "ExportResult",
    "parse_size",
    "lora_layers",
]
