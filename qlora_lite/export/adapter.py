"""The PEFT adapter directory: writing it, reading it back, and the quantization record it carries.

Adapter dir: `adapter_config.json` + `adapter_model.safetensors` with peft's key names
(`base_model.model.<module path>.lora_A.weight`; DoRA adds `<module path>.lora_magnitude_vector` and
`"use_dora": true`), so `peft.PeftModel.from_pretrained` loads it.
`adapter_config.json` carries one extra key, "qlora_lite", with the quantization the adapter was trained
against (peft ignores unknown keys); the merged export re-creates that quantization from it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..config.settings import QuantConfig
from ..errors import AdapterError, ConfigError
from ..io.atomic import save_safetensors_atomic, write_json_atomic
from ..model import quant
from ..model.embeddings import token_state_dict
from ..model.lora import (
    adapter_state_dict,
    saved_modules_state_dict,
)
from .adapter_config import QLORA_KEY, check_quant_record, read_adapter_config_file

PEFT_PREFIX = "base_model.model."
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # DoRA's magnitude [out], as peft names it in the file
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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


def _check_model(model: object, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise AdapterError(
            f"{what} needs the torch model from load_quantized (an nn.Module), not {type(model).__name__}; pass the model itself."
        )


def adapter_config_dict(model: nn.Module) -> dict:
    """The `adapter_config.json` content peft expects for this model's LoRA settings, plus our quant record."""
    _check_model(model, "save_adapter")
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
        "modules_to_save": list(getattr(model, "qlora_modules_to_save", None) or []) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": cfg.use_dora,
        "revision": None,
        "trainable_token_indices": getattr(model, "qlora_tokens", None),
    }
    record = _quant_record(model)
    if record is not None:
        config[QLORA_KEY] = record
    # the resized base's rows, so export and chat can grow the base the same
    if config["trainable_token_indices"] or config["modules_to_save"]:
        config.setdefault(QLORA_KEY, {})["vocab_size"] = int(model.get_input_embeddings().weight.shape[0])
    return config


def save_adapter(model: nn.Module, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's LoRA adapter in PEFT's format to `out_dir` (each file written atomically).

    `state`: the tensors to write, keyed by module path as `adapter_state_dict` keys them, in place of the model's
    own (a sharded model's adapter gathered whole by `training.fsdp.full_adapter_state`); the config still comes
    from the model. Raises `AdapterError` for a model without LoRA or an `out_dir` that is a file; a failed write
    (full disk, permissions) raises the `OSError`, leaving any previous adapter files whole.
    """
    config = adapter_config_dict(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AdapterError(f"adapter output path {out_dir} is a file; choose a directory path for the adapter.")
    if state is None:
        state = {**adapter_state_dict(model), **token_state_dict(model), **saved_modules_state_dict(model)}
    tensors = {PEFT_PREFIX + k: v.detach() for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json_atomic(out_dir / ADAPTER_CONFIG, config)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The parsed `adapter_config.json` of an adapter dir, checked to be a LoRA (or DoRA) adapter whose every key
    has the right type (`AdapterError` naming the file and key otherwise)."""
    if not isinstance(adapter_dir, (str, os.PathLike)):
        raise AdapterError(
            f"the adapter directory must be a path (str or Path), not {type(adapter_dir).__name__}; pass the adapter/ folder."
        )
    adapter_dir = Path(adapter_dir)
    if adapter_dir.exists() and not adapter_dir.is_dir():
        raise AdapterError(
            f"adapter path {adapter_dir} is a file; give the adapter/ folder of a run (or a peft adapter dir)."
        )
    if not adapter_dir.is_dir():
        raise AdapterError(
            f"adapter directory {adapter_dir} does not exist; give the adapter/ folder of a run (or a peft adapter dir)."
        )
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(
            f"{adapter_dir} has no {ADAPTER_CONFIG}; point to a directory written by save_adapter or peft."
        )
    config = read_adapter_config_file(path)
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(n, str) and n for n in saved)):
        raise AdapterError(f"{path} has modules_to_save {saved!r}, not a list of module names; re-save the adapter.")
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{path} trains biases (bias={config['bias']!r}), which qlora-lite does not support; re-train with bias 'none'."
        )
    adapter_quant_settings(config, path)  # the record's values, e.g. bits 5
    return config


def _module_key(adapter_key: str) -> str:
    """peft's file key -> `<module path>.lora_A.weight` (prefix and adapter name removed)."""
    name = adapter_key[len(PEFT_PREFIX) :] if adapter_key.startswith(PEFT_PREFIX) else adapter_key
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


class AdapterWeights:
    """`adapter_model.safetensors` read whole through one open handle, so every tensor comes from one version of
    the file even if it is replaced while we work (LoRA tensors are small next to the base model).

    Offers the reads the export plan needs: `keys()`, `shape(key)`, `read(key, dtype)`, `path`.
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError
        from safetensors.torch import load

        self.path = path
        with open(path, "rb") as f:
            data = f.read()
        try:
            self.tensors: dict[str, torch.Tensor] = load(data)
        except (SafetensorError, ValueError) as exc:
            raise AdapterError(
                f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:160]}); re-save the adapter."
            ) from None

    def keys(self) -> list[str]:
        """Tensor names in sorted order (the order of the file's header), so every message is reproducible."""
        return sorted(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor (shared, not copied: do not modify it), converted to `dtype` when given."""
        tensor = self.tensors[key]
        return tensor if dtype is None else tensor.to(dtype)


def read_adapter(adapter_dir: str | Path) -> tuple[dict, AdapterWeights]:
    """An adapter's checked config and its weights, read as one consistent pair.

    The weights are read whole from one open file. The config is read again after them: when the adapter dir
    was rewritten in between and the config changed, the pair would not belong together, so it is refused.
    """
    config = read_adapter_config(adapter_dir)
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{Path(adapter_dir)} has no {ADAPTER_WEIGHTS}; only safetensors adapters are loaded.")
    weights = AdapterWeights(path)
    try:
        unchanged = read_adapter_config(adapter_dir) == config
    except AdapterError:
        unchanged = False
    if not unchanged:
        raise AdapterError(
            f"the adapter in {adapter_dir} changed while it was being read; read it again once it is written."
        )
    shapes = {key: weights.shape(key) for key in weights.keys()}
    check_adapter_ranks(config, shapes, Path(adapter_dir) / ADAPTER_CONFIG)
    check_dora_tensors(config, shapes, Path(adapter_dir) / ADAPTER_CONFIG)
    return config, weights


def check_adapter_ranks(config: dict, shapes: dict[str, tuple[int, ...]], where: str | Path) -> None:
    """Refuse LoRA tensors whose rank is not the `r` (or `rank_pattern` entry) of the adapter's config."""
    for key, shape in sorted(shapes.items()):
        name = _module_key(key)
        for suffix, dim in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if name.endswith(suffix) and len(shape) == 2:
                module = name[: -len(suffix)]
                r = _pattern_value(config.get("rank_pattern"), module, config["r"])
                if shape[dim] != r:
                    says = f"r is {r}" if r == config["r"] else f"rank_pattern gives {module} rank {r}"
                    raise AdapterError(
                        f"adapter tensor {key!r} has rank {shape[dim]} (shape {list(shape)}) but {where} says {says}; "
                        "the weights and the config belong to different adapters, re-save the adapter."
                    )


def check_dora_tensors(config: dict, shapes: dict[str, tuple[int, ...]], where: str | Path) -> None:
    """DoRA's magnitude vectors: one 1-D `lora_magnitude_vector` beside each lora_B when the config says use_dora,
    none otherwise (peft would ignore them, and the adapter would compute something else)."""
    names = {_module_key(key): key for key in shapes}
    magnitudes = sorted(name for name in names if name.endswith(MAGNITUDE_SUFFIX))
    if not config.get("use_dora"):
        if magnitudes:
            raise AdapterError(
                f"adapter tensor {names[magnitudes[0]]!r} is a DoRA magnitude, but {where} has use_dora false; "
                "set use_dora to true if the adapter was trained with DoRA, or re-save the adapter."
            )
        return
    for name in sorted(n for n in names if n.endswith(".lora_B.weight")):
        module = name[: -len(".lora_B.weight")]
        key = names.get(module + MAGNITUDE_SUFFIX)
        if key is None:
            raise AdapterError(
                f"{where} has use_dora true but the adapter has no {module}{MAGNITUDE_SUFFIX} beside its LoRA "
                "matrices; re-save the adapter."
            )
        out_f = shapes[names[name]][0] if len(shapes[names[name]]) == 2 else None
        if shapes[key] != (out_f,):
            raise AdapterError(
                f"adapter tensor {key!r} has shape {list(shapes[key])} but the DoRA magnitude of {module} must be "
                f"[{out_f}] (one value per row of its lora_B); re-save the adapter."
            )
    orphans = [n for n in magnitudes if n[: -len(MAGNITUDE_SUFFIX)] + ".lora_B.weight" not in names]
    if orphans:
        raise AdapterError(
            f"adapter tensor {names[orphans[0]]!r} is a DoRA magnitude without LoRA matrices beside it; re-save the adapter."
        )


def read_adapter_tensors(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed by module path (`<path>.lora_A.weight`), peft's prefix removed."""
    _, weights = read_adapter(adapter_dir)
    return {_module_key(key): weights.read(key) for key in weights.keys()}


def _stored_adapter_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    # peft saves fp32 adapters and computes them in fp32; rounding them to bf16 would move logits by ~1%.
    dtypes = {t.dtype for k, t in tensors.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    return quant.COMPUTE_DTYPE if dtypes == {quant.COMPUTE_DTYPE} else torch.float32


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _as_record_key(exc: ConfigError) -> str:
    """A `quant.*` settings message restated with the record's key names (`qlora_lite.bits`)."""
    return re.sub(r"\bquant\.", f"{QLORA_KEY}.", str(exc)).rstrip(".")


def adapter_quant_settings(config: dict, where: str | Path = ADAPTER_CONFIG) -> tuple[QuantConfig, bool]:
    """The quantization an adapter was trained against, and whether the adapter recorded it.

    Adapters saved by peft carry no record; they get the QLoRA defaults (4-bit NF4, double quant,
    block size 64), which are also `load_quantized`'s defaults. A record of the wrong shape or with a value
    out of range raises `AdapterError` naming the key (`where` names the file in the message).
    """
    if QLORA_KEY not in config:
        return QuantConfig(), False
    record = config[QLORA_KEY]
    check_quant_record(record, where)
    keys = ("bits", "quant_type", "double_quant", "blocksize", "int8_threshold")
    settings = QuantConfig(**{k: record[k] for k in keys if k in record})
    try:
        settings.validate()
    except ConfigError as exc:  # names a quant.* field; restate it as an adapter problem
        raise AdapterError(
            f"{where} records invalid quantization settings ({_as_record_key(exc)}); re-save the adapter."
        ) from None
    return settings, True


def adapter_quantized_modules(config: dict) -> list[str] | None:
    """The module paths that were quantized while the adapter trained, when the adapter recorded them."""
    record = config.get(QLORA_KEY)
    modules = record.get("quantized_modules") if isinstance(record, dict) else None
    return list(modules) if modules else None


__all__ = [
    "PEFT_PREFIX", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "QLORA_KEY", "adapter_config_dict", "save_adapter", "read_adapter_config",
    "read_adapter_tensors", "read_adapter", "check_adapter_ranks", "check_dora_tensors", "AdapterWeights", "adapter_quant_settings", "adapter_quantized_modules",
]  # fmt: skip
