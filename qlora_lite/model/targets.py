"""Which linear layers a `target_modules` setting selects, with peft's matching rules.

- "all-linear": every linear layer inside the decoder blocks; never `lm_head` or other heads.
- a list of names: a module matches when its path equals a name or ends with "." + name.
- any other string: a regular expression that must match the whole module path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..errors import ConfigError

TargetSpec = str | Iterable[str]


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    from .quant import bnb

    return (nn.Linear, Conv1D, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can wrap: `nn.Linear`, GPT-2's `Conv1D`, or a bitsandbytes quantized linear."""
    return isinstance(module, _linear_types())


def decoder_blocks_path(model: nn.Module) -> str | None:
    """Path of the ModuleList that holds the decoder blocks (the longest ModuleList in the model)."""
    best, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            best, best_len = name, len(module)
    return best


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like layer of the model by path, LoRA wrappers' inner layers excluded."""
    return {
        name: module
        for name, module in model.named_modules()
        if is_linear(module) and ".lora_" not in name and not name.endswith(".base_layer")
    }


def _display_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def resolve_targets(model: nn.Module, target_modules: TargetSpec = "all-linear") -> list[str]:
    """Paths of the linear layers `target_modules` selects; raises `ConfigError` when nothing fits."""
    layers = linear_layers(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        blocks = decoder_blocks_path(model)
        prefix = f"{blocks}." if blocks else ""
        chosen = [n for n in layers if n.startswith(prefix)]
        if not chosen:
            raise ConfigError(
                "target_modules 'all-linear' found no linear layer inside the decoder blocks of this model."
            )
        return chosen
    available = sorted({_display_name(n) for n in layers})
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ConfigError(f"target_modules {target_modules!r} is not a valid regular expression ({exc}).") from None
        chosen = [n for n in layers if pattern.fullmatch(n)]
        if not chosen:
            raise ConfigError(
                f"target_modules regex {target_modules!r} matches no linear layer; available layer names: {', '.join(available)}."
            )
        return chosen
    names = list(target_modules)
    for target in names:
        if not any(n == target or n.endswith("." + target) for n in layers):
            raise ConfigError(
                f"target module {target!r} is not a linear layer of this model; available names: {', '.join(available)}."
            )
    return [n for n in layers if any(n == t or n.endswith("." + t) for t in names)]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated decoder layers (what FSDP shards one by one and torch.compile compiles): those whose class the model lists in `_no_split_modules` (what transformers'
    own FSDP wrapping uses), else the children of `model.model.layers`; outermost matches only, in model order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names and module is not model:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    if not found:
        layers = getattr(getattr(model, "model", None), "layers", None)
        found = list(layers) if isinstance(layers, nn.ModuleList) else []
    return found
