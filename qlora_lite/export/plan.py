"""The merged export's plan: every input checked and the output's tensors and shards decided from headers alone.

The output's shard plan (names, shapes, offsets) is known from the safetensors headers and the adapter's
config, so `plan_export` raises on any bad input before a single weight is read or a file written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.settings import QuantConfig
from ..config.units import parse_size
from ..errors import AdapterError, ConfigError, ExportError
from ..io.safetensors import SafetensorsFile, weight_files
from ..model.lora import lora_scaling, matches_module_entry
from .adapter import (
    ADAPTER_CONFIG,
    MAGNITUDE_SUFFIX,
    AdapterWeights,
    _module_key,
    _pattern_value,
    adapter_quant_settings,
    adapter_quantized_modules,
    read_adapter,
)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MERGE_MODES = ("dequantized", "original")
DEFAULT_MAX_SHARD_SIZE = "5GB"
TOKEN_SUFFIX = ".token_adapter.trainable_tokens_delta"


@dataclass(frozen=True)
class _Lora:
    key_a: str
    key_b: str
    scaling: float
    key_m: str | None = None  # DoRA's magnitude [out] (`lora_magnitude_vector`); None for plain LoRA


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
    grow_to: int = 0  # > 0: rows appended up to this many, each the mean of the base's rows (resized vocabulary)
    token_key: str | None = None  # the adapter's trained rows (`trainable_tokens_delta`) written over `token_rows`
    token_rows: list[int] = field(default_factory=list)
    saved_key: str | None = None  # a modules_to_save tensor of the adapter that replaces this one whole

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
    adapter: AdapterWeights  # read whole at planning: the merge uses exactly the tensors checked here
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


def _max_shard_bytes(value: str | int) -> int:
    """The max shard size in bytes, read by the shared size parser; its message raised as an `ExportError`."""
    try:
        return parse_size(value, "max shard size")
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def _check_options(dtype: str, merge_into: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported for export; use 'float16' or 'bfloat16'.")
    if merge_into not in MERGE_MODES:
        raise ExportError(
            f"merge_into {merge_into!r} is unknown; use 'dequantized' (the function the adapter trained against) or 'original'."
        )
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
        raise ExportError(
            f"output directory {out_dir} exists and is not empty; choose another --out or pass --overwrite to replace it."
        )
    return True


def _saved_keys(adapter: AdapterWeights, config: dict) -> dict[str, str]:
    """Tensor name (`<module path>.<param>`) -> adapter key, for the tensors of the config's modules_to_save."""
    saved = config.get("modules_to_save") or []
    out = {}
    for key in adapter.keys():
        module = _module_key(key).rpartition(".")[0]
        if (
            ".lora_" not in key
            and not key.endswith(TOKEN_SUFFIX)
            and any(matches_module_entry(module, e) for e in saved)
        ):
            out[_module_key(key)] = key
    return out


def _lora_index(adapter: AdapterWeights, config: dict) -> dict[str, _Lora]:
    """module path -> its adapter keys (DoRA's magnitude included) and scaling; refuses tensors that are not LoRA
    A/B matrices (`read_adapter` has checked each magnitude against its lora_B and the config's use_dora)."""
    keys: dict[str, dict[str, str]] = {}
    magnitudes: dict[str, str] = {}
    saved = set(_saved_keys(adapter, config).values())
    for key in adapter.keys():
        name = _module_key(key)
        if key in saved:
            continue  # a whole modules_to_save tensor: `_plan_saved_modules` places it
        if name.endswith(MAGNITUDE_SUFFIX):
            magnitudes[name[: -len(MAGNITUDE_SUFFIX)]] = key
            continue
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                keys.setdefault(name[: -len(suffix)], {})[part] = key
                break
        else:
            if name.endswith(TOKEN_SUFFIX):
                continue  # new token rows: `_plan_token_rows` places them
            raise AdapterError(
                f"adapter tensor {key!r} is not a LoRA A/B matrix nor in modules_to_save (embedding LoRA and biases are not supported); re-train a plain LoRA adapter."
            )
    index: dict[str, _Lora] = {}
    for module, pair in keys.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise AdapterError(f"the adapter has no {module}.{missing}.weight for its other half; re-save the adapter.")
        for key in pair.values():
            if len(adapter.shape(key)) != 2:
                raise AdapterError(
                    f"adapter tensor {key!r} has shape {list(adapter.shape(key))}, not a matrix; re-save the adapter."
                )
        r = adapter.shape(pair["lora_A"])[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        scaling = lora_scaling(r, alpha, bool(config.get("use_rslora")))
        index[module] = _Lora(pair["lora_A"], pair["lora_B"], scaling, magnitudes.get(module))
    if not index and not saved and not any(_module_key(key).endswith(TOKEN_SUFFIX) for key in adapter.keys()):
        raise AdapterError(f"{adapter.path} holds no LoRA tensors; re-save the adapter.")
    return index


def _check_lora_shapes(item: _Item, lora: _Lora, adapter: AdapterWeights) -> None:
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
    if lora.key_m is not None and adapter.shape(lora.key_m) != (out_f,):
        raise AdapterError(
            f"adapter tensor {lora.key_m!r} has shape {list(adapter.shape(lora.key_m))} but the base weight {item.key!r} "
            f"has {out_f} output rows, one DoRA magnitude each; the adapter belongs to a different base model."
        )


def _base_items(base_dir: Path, shards: list[SafetensorsFile], out_dtype: torch.dtype, trust_remote_code: bool):
    """Output items for every checkpoint tensor, with the checkpoint key -> model path map and Conv1D flags, and
    the module paths of the input embedding and output head (None where the model has none)."""
    from ..model.checks import check_checkpoint
    from ..model.loader import build_skeleton, is_conv1d, load_config

    skeleton = build_skeleton(
        load_config(base_dir, trust_remote_code), trust_remote_code, str(base_dir / "config.json")
    )
    key_maps = check_checkpoint(skeleton, shards, base_dir)  # the base's config must describe its weights
    items, paths, seen = [], {}, set()
    embed, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    names = {id(m): n for n, m in skeleton.named_modules()}
    vocab_modules = tuple(names.get(id(m)) if m is not None else None for m in (embed, head))
    for shard, key_map in zip(shards, key_maps):
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
            elif name is not None and name.endswith(".bias"):
                paths[name] = item  # by its full name: an output head's bias grows with it
            items.append(item)
    return items, paths, vocab_modules


def _token_rows(spec: object, module: str) -> list[int] | None:
    """The rows `trainable_token_indices` gives `module` (peft: a list for every module, or name -> list)."""
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        return spec.get(module.rpartition(".")[2], spec.get(module))
    return None


def _plan_token_rows(
    config: dict,
    adapter: AdapterWeights,
    by_path: dict[str, _Item],
    vocab_modules: tuple[str | None, str | None],
    model_config: dict,
    where: Path,
) -> None:
    """Grow the embedding and head items to the adapter's `vocab_size` (mean rows) and place its trained rows.

    A head tied to the embedding (no head delta in the adapter) takes the embedding's rows, as in training.
    `model_config`'s vocab_size (and its text_config's) is set to the new size.
    """
    deltas = {_module_key(k)[: -len(TOKEN_SUFFIX)]: k for k in adapter.keys() if _module_key(k).endswith(TOKEN_SUFFIX)}
    if not deltas:
        return
    spec = config.get("trainable_token_indices")
    embed_path, head_path = vocab_modules
    rows = int(((config.get("qlora_lite") or {}).get("vocab_size")) or 0)
    for module in deltas:
        if module not in (embed_path, head_path) or module not in by_path:
            raise AdapterError(
                f"adapter tensor {deltas[module]!r} trains rows of {module}, which is not this base's embedding or "
                "output head; the adapter belongs to a different base model."
            )
    embed_key = deltas.get(embed_path)
    for module in (embed_path, head_path):
        item = by_path.get(module)
        if module is None or item is None or len(item.shape) != 2:
            continue
        key = deltas.get(module, embed_key)  # a tied head's rows are the embedding's
        indices = _token_rows(spec, module) or _token_rows(spec, embed_path or "") or []
        if key is None or not indices:
            continue
        base_rows, dim = item.shape
        target = max(rows, max(indices) + 1)
        if target < base_rows or adapter.shape(key) != (len(indices), dim):
            raise AdapterError(
                f"adapter tensor {key!r} has shape {list(adapter.shape(key))} for rows {indices} of a "
                f"{target}-row vocabulary, but the base's {item.key!r} is {list(item.shape)}; the adapter belongs to "
                "a different base model."
            )
        if item.lora is not None or item.dequantize:
            raise AdapterError(
                f"the adapter in {where} trains both LoRA and new token rows on {module}, which the merged export "
                "does not support; re-train without LoRA on that module."
            )
        item.shape, item.grow_to, item.token_key, item.token_rows = (target, dim), target, key, list(indices)
        bias = by_path.get(f"{module}.bias")
        if bias is not None and len(bias.shape) == 1:
            bias.shape, bias.grow_to = (target,), target
        for cfg in (model_config, model_config.get("text_config")):
            if isinstance(cfg, dict) and ("vocab_size" in cfg or cfg is model_config):
                cfg["vocab_size"] = target


def _plan_saved_modules(config: dict, adapter: AdapterWeights, by_path: dict[str, _Item], model_config: dict) -> None:
    """Point each base tensor of a modules_to_save module at the adapter's trained tensor (grown vocabulary included)."""
    for name, key in sorted(_saved_keys(adapter, config).items()):
        item = by_path.get(name[: -len(".weight")] if name.endswith(".weight") else name)
        shape = adapter.shape(key)
        if item is None or len(shape) != len(item.shape) or shape[1:] != item.shape[1:] or shape[0] < item.shape[0]:
            raise AdapterError(
                f"adapter tensor {key!r} (shape {list(shape)}) has no matching tensor in the base"
                f"{'' if item is None else f' ({item.key!r} is {list(item.shape)})'}; the adapter belongs to a different base model."
            )
        if item.lora is not None or item.dequantize:
            raise AdapterError(
                f"adapter tensor {key!r} replaces {item.key!r}, which LoRA also adapts; re-save the adapter."
            )
        if shape[0] > item.shape[0]:  # a vocabulary grown for new tokens
            for cfg in (model_config, model_config.get("text_config")):
                if isinstance(cfg, dict) and ("vocab_size" in cfg or cfg is model_config):
                    cfg["vocab_size"] = shape[0]
        item.shape, item.saved_key = tuple(shape), key


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
    revision: str | None = None,
) -> ExportPlan:
    """Check every input and decide the output layout from headers alone; raises before anything is written.

    `revision` (branch, tag or commit) picks the snapshot of a hub-id base."""
    from ..model.loader import check_model_dir

    out_dtype = _check_options(dtype, merge_into)
    max_bytes = _max_shard_bytes(max_shard_size)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ExportError(f"the output directory must be a path (str or Path), not {type(out_dir).__name__}.")
    base_dir = check_model_dir(base_path, revision)
    shards = [SafetensorsFile(p) for p in weight_files(base_dir)]
    config, adapter = read_adapter(adapter_dir)
    loras = _lora_index(adapter, config)
    settings, recorded = adapter_quant_settings(config, Path(adapter_dir) / ADAPTER_CONFIG)
    replace = _check_out_dir(Path(out_dir), base_dir, Path(adapter_dir), overwrite)

    items, by_path, vocab_modules = _base_items(base_dir, shards, out_dtype, trust_remote_code)
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
    _plan_token_rows(config, adapter, by_path, vocab_modules, model_config, Path(adapter_dir))
    _plan_saved_modules(config, adapter, by_path, model_config)
    plan = ExportPlan(
        base_dir,
        Path(adapter_dir),
        Path(out_dir),
        out_dtype,
        merge_into,
        settings,
        recorded,
        adapter,
        model_config,
        items,
    )
    plan.shards = _assign_shards(items, max_bytes)
    plan.replace_existing = replace
    return plan


__all__ = ["ExportPlan", "ExportResult", "plan_export", "DEFAULT_MAX_SHARD_SIZE"]
