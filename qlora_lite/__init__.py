"""qlora-lite: QLoRA fine-tuning of Hugging Face causal LMs on one constrained GPU.

Public API (see ARCHITECTURE.md): `load_quantized`, `apply_lora`, `save_adapter`, `load_adapter`,
`export_merged`, `estimate_memory`, `train`, and the `QloraLiteError` family.
Names are imported on first use, except `train`: it shares its name with the `qlora_lite.train` module,
and importing a submodule rebinds the package attribute to the module, so the function is bound eagerly.
"""

from __future__ import annotations

import importlib

from .errors import QloraLiteError
from .train import TrainResult, train  # noqa: E402  (see the docstring)

__version__ = "0.1.0"

_LAZY = {
    "load_quantized": "loader",
    "apply_lora": "lora",
    "trainable_summary": "lora",
    "count_parameters": "lora",
    "save_adapter": "export",
    "load_adapter": "export",
    "export_merged": "export",
    "estimate_memory": "memory",
    "MemoryReport": "memory",
    "TrainConfig": "config",
    "load_config": "config",
}

__all__ = ["QloraLiteError", "TrainResult", "__version__", "train", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'qlora_lite' has no attribute {name!r}")
