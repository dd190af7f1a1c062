"""Argument checks for the Python API's model functions (`load_quantized`, `apply_lora`).

A wrong type or value becomes a `ConfigError` naming the function and the argument, before torch, transformers
or bitsandbytes see it and raise their own TypeError, ValueError or AssertionError. Range rules (bits 4 or 8,
r >= 1, ...) stay in the settings schema (`config/settings`); this module checks what the schema cannot: types.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..errors import ConfigError

ADAPTER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# torch.manual_seed accepts the int64 and uint64 ranges together.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(func: str, name: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{func}: {name} must be {what}, got {_show(value)} ({type(value).__name__}).")


def check_bool(func: str, name: str, value: Any) -> None:
    """True or False only: a string such as "no" would be truthy."""
    if not isinstance(value, bool):
        raise _refuse(func, name, "True or False", value)


def check_int(func: str, name: str, value: Any, what: str) -> None:
    """A whole number (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(func, name, what, value)


def check_number(func: str, name: str, value: Any, what: str) -> None:
    """A finite int or float (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refuse(func, name, what, value)


def check_targets(func: str, value: Any) -> None:
    """'all-linear', a regex string, or a non-empty list / tuple of module names."""
    if isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return
    raise _refuse(func, "target_modules", "'all-linear', a regex string or a list of module names", value)


def check_path(func: str, name: str, value: Any) -> None:
    """A str or os.PathLike naming a file or folder."""
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(path, str) or not path or "\0" in path:
        raise _refuse(func, name, "the path of a model directory (str or pathlib.Path)", value)


def check_device(func: str, value: Any) -> torch.device | None:
    """None (CUDA when present, else the CPU), 'cpu', 'cuda', 'cuda:N', an int N or a torch.device; the CUDA
    device must exist."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise _refuse(func, "device", "'cpu', 'cuda', 'cuda:N' or a torch.device", value)
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise _refuse(func, "device", "'cpu', 'cuda', 'cuda:N' or a torch.device", value) from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{func}: device {str(device)!r} is not supported; use 'cpu' or 'cuda'.")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{func}: device {str(device)!r} was asked for but torch sees no CUDA GPU; use 'cpu'.")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{func}: device {str(device)!r} does not exist; torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}."
            )
    return device


def check_load_arguments(
    model_path: Any,
    bits: Any,
    quant_type: Any,
    double_quant: Any,
    device: Any,
    target_modules: Any,
    blocksize: Any,
    int8_threshold: Any,
    trust_remote_code: Any,
    load_tokenizer: Any,
) -> None:
    """The types `load_quantized` needs; the schema (`QuantConfig`) then checks the values."""
    func = "load_quantized"
    check_path(func, "model_path", model_path)
    check_int(func, "bits", bits, "4 or 8")
    if not isinstance(quant_type, str):
        raise _refuse(func, "quant_type", "'nf4' or 'fp4'", quant_type)
    check_bool(func, "double_quant", double_quant)
    check_device(func, device)
    check_targets(func, target_modules)
    check_int(func, "blocksize", blocksize, "a whole number such as 64")
    check_number(func, "int8_threshold", int8_threshold, "a finite number such as 6.0")
    check_bool(func, "trust_remote_code", trust_remote_code)
    check_bool(func, "load_tokenizer", load_tokenizer)


def check_lora_arguments(
    model: Any,
    r: Any,
    alpha: Any,
    dropout: Any,
    target_modules: Any,
    rslora: Any,
    adapter_dtype: Any,
    seed: Any,
) -> None:
    """The types `apply_lora` needs; the schema (`LoraConfig`) then checks the values."""
    func = "apply_lora"
    if not isinstance(model, torch.nn.Module):
        raise _refuse(func, "model", "a torch.nn.Module such as load_quantized returns", model)
    check_int(func, "r", r, "a whole number such as 8 or 16")
    check_number(func, "alpha", alpha, "a finite number such as 16 or 32")
    check_number(func, "dropout", dropout, "a number in [0, 1)")
    check_targets(func, target_modules)
    check_bool(func, "rslora", rslora)
    if not any(adapter_dtype is d for d in ADAPTER_DTYPES):  # dtypes are singletons; `in` would call ==
        raise _refuse(func, "adapter_dtype", "torch.bfloat16, torch.float16 or torch.float32", adapter_dtype)
    if seed is not None:
        check_int(func, "seed", seed, "None or a whole number")
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise _refuse(func, "seed", f"in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", seed)
