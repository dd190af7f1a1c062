"""Adapters in PEFT's format, and the merged fp16/bf16 export.

Adapter dir: `adapter_config.json` + `adapter_model.safetensors` with peft's key names
(`base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterError
from .files import SafetensorsFile, save_safetensors_atomic, write_json_atomic
from .lora import adapter_state_dict, apply_lora, lora_layers

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft_target_modules(model: nn.Module) -> list[str] | str:
    settings = model.qlora_lora
    spec = settings.config.target_modules
    if isinstance(spec, str) and spec != "all-linear":
        return spec  # a regex: peft matches it against full module paths as we did
    return sorted({name.rsplit(".", 1)[-1] for name in settings.targets})


def adapter_config_dict(model: nn.Module) -> dict:
    """The `adapter_config.json` content peft expects for this model's LoRA settings."""
    settings = getattr(model, "qlora_lora", None)
    if settings is None:
        raise AdapterError("this model has no LoRA adapters; call apply_lora(model, ...) first.")
    cfg = settings.config
    return {
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
    """The parsed `adapter_config.json` of an adapter dir, checked to be a LoRA adapter."""
    adapter_dir = Path(adapter_dir)
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
    return config


def read_adapter_tensors(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed by module path (`<path>.lora_A.weight`), peft's prefix removed."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{Path(adapter_dir)} has no {ADAPTER_WEIGHTS}; only safetensors adapters are loaded.")
    st = SafetensorsFile(path)
    tensors = {}
    for key in st.keys():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        tensors[name] = st.read(key)
    return tensors


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model`, applying LoRA first if the model has none."""
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    if getattr(model, "qlora_lora", None) is None:
        targets = config["target_modules"]
        apply_lora(
            model,
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=targets if isinstance(targets, str) else list(targets),
            rslora=bool(config.get("use_rslora", False)),
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
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return model


__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "read_adapter_tensors", "adapter_config_dict", "lora_layers"]
