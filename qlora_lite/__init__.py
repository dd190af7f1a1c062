"""qlora-lite: QLoRA fine-tuning of Hugging Face causal LMs on one constrained GPU.

Public API (see ARCHITECTURE.md): `load_quantized`, `apply_lora`, `save_adapter`, `load_adapter`,
`export_merged`, `estimate_memory`, `train`, `TrainConfig`, and the `QloraLiteError` family.
Every name is imported on first use, so `import qlora_lite` loads neither torch's model stack,
bitsandbytes nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import QloraLiteError

__version__ = "0.1.0"

_LAZY = {
    "load_quantized": "model.loader",
    "apply_lora": "model.lora",
    "trainable_summary": "model.lora",
    "count_parameters": "model.lora",
    "save_adapter": "export.adapter",
    "load_adapter": "export.adapter_load",
    "export_merged": "export.hf_dir",
    "estimate_memory": "memory.report",
    "MemoryReport": "memory.report",
    "TrainConfig": "config.settings",
    "load_config": "config.load",
    "train": "training.loop",
    "TrainResult": "training.loop",
}

__all__ = ["QloraLiteError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'qlora_lite' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
