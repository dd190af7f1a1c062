"""LoRA over a frozen (quantized) linear layer, injection into a model, and the adapter state dict.

`y = base(x) + scaling * B(A(dropout(x)))` with scaling = alpha / r (alpha / sqrt(r) with rslora).
The base is a bitsandbytes `Linear4bit` / `Linear8bitLt` (or a plain linear); its forward multiplies by
the packed weight and its backward re-dequantizes it, so no dequantized copy is kept for backward.
A is Kaiming-uniform (a = sqrt(5)) and B is zero, as in peft, so a fresh adapter leaves outputs unchanged.
`apply_lora` turns the model's transformers `save_pretrained` (and so `push_to_hub`) into a refusal: it would write
the LoRA-wrapped layers under names transformers does not know, a checkpoint that loads with every adapted weight
missing. `save_adapter` and `export_merged` (in `export/`, above this layer) are the two ways to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config.settings import LoraConfig
from ..errors import ConfigError, ExportError
from .arguments import check_lora_arguments
from .quant import COMPUTE_DTYPE
from .targets import TargetSpec, resolve_targets


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer, GPT-2's Conv1D included."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nf") and hasattr(module, "weight"):  # transformers Conv1D: weight is [in, out]
        return int(module.weight.shape[0]), int(module.nf)
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraLinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update in `adapter_dtype` (bf16 by default)."""

    # the adapter's parameters, by their name in the module (and in peft's file); variants (DoRA) add theirs
    adapter_names: tuple[str, ...] = ("lora_A.weight", "lora_B.weight")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        adapter_dtype: torch.dtype = COMPUTE_DTYPE,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_dims(base_layer)
        self.r = r
        self.scaling = lora_scaling(r, alpha, rslora)
        device = next((t.device for t in base_layer.parameters() if t.device.type != "meta"), torch.device("cpu"))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) drawn in fp32 then cast, B = 0 (peft's default)."""
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32, device=self.lora_A.weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        adapter_in = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(adapter_in))
        return torch.add(result, update.to(result.dtype), alpha=self.scaling)  # one kernel, no scaled copy

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


@dataclass
class LoraSettings:
    """What `apply_lora` did to a model, kept on it for saving and export."""

    config: LoraConfig
    targets: list[str] = field(default_factory=list)


def refuse_save_pretrained(*args: object, **kwargs: object) -> None:
    """What `save_pretrained` is on a model `apply_lora` adapted: a refusal naming the two ways to save it."""
    raise ExportError(
        "save_pretrained cannot save a qlora-lite model, whose LoRA layers transformers would load as missing "
        "weights; save the adapter with qlora_lite.save_adapter(model, dir) (PEFT format) or write a merged fp16 "
        "model with qlora_lite.export_merged(base, adapter, out)."
    )


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: TargetSpec = "all-linear",
    *,
    rslora: bool = False,
    adapter_dtype: torch.dtype = COMPUTE_DTYPE,
    seed: int | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Wrap the targeted linear layers of `model` with LoRA, in place; only A and B stay trainable.

    `use_dora`: DoRA layers (`model.dora.DoraLinear`, peft's `use_dora`) instead, which also train a magnitude
    vector per layer (started from the row norms of the loaded base weights).

    Raises `ConfigError` for an argument of the wrong type (a model that is not a torch module, r=2.5,
    alpha="32", ...), r <= 0, a non-finite alpha, r larger than a layer's smaller side, or targets that match
    nothing. Afterwards the model's `save_pretrained` raises `ExportError` pointing at `save_adapter` / `export_merged`.
    """
    check_lora_arguments(model, r, alpha, dropout, target_modules, rslora, adapter_dtype, seed)
    if not isinstance(use_dora, bool):
        raise ConfigError(f"apply_lora: use_dora must be True or False, not {use_dora!r}.")
    if isinstance(target_modules, tuple):
        target_modules = list(target_modules)
    settings = LoraConfig(
        r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, rslora=rslora, use_dora=use_dora
    )
    settings.validate()
    if getattr(model, "qlora_lora", None) is not None:
        raise ConfigError("this model already has LoRA adapters; load a fresh base model to apply new ones.")
    targets = resolve_targets(model, target_modules)
    if "" in targets:
        raise ConfigError(
            "apply_lora: the model is itself a linear layer; give the model that holds the layers to adapt."
        )
    for name in targets:
        in_f, out_f = linear_dims(model.get_submodule(name))
        if r > min(in_f, out_f):
            raise ConfigError(
                f"lora.r is {r}, larger than the smaller side ({min(in_f, out_f)}) of layer {name} [{out_f} x {in_f}]; "
                f"use r <= {min(in_f, out_f)}."
            )
    model.requires_grad_(False)
    layer_class = LoraLinear
    if use_dora:
        from .dora import DoraLinear

        layer_class = DoraLinear
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for name in targets:
            parent_path, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, child, layer_class(getattr(parent, child), r, alpha, dropout, rslora, adapter_dtype))
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    model.qlora_lora = LoraSettings(config=settings, targets=targets)
    if callable(getattr(model, "save_pretrained", None)):  # on this instance only; the class is left alone
        model.save_pretrained = refuse_save_pretrained
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA layer of the model by module path (DoRA layers included)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors keyed by module path: `<path>.lora_A.weight`, `<path>.lora_B.weight` (and DoRA's
    `<path>.lora_magnitude_vector`)."""
    state = {}
    for name, layer in lora_layers(model).items():
        for key in layer.adapter_names:
            state[f"{name}.{key}"] = layer.get_parameter(key)
    return state


def matches_module_entry(path: str, entry: str) -> bool:
    """peft's modules_to_save match: the module path is the entry or ends with `.<entry>`."""
    return path == entry or path.endswith("." + entry)


def apply_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """peft's `modules_to_save`: every parameter of each module whose path ends with an entry of `names` trains whole.

    Call after `apply_lora` (which freezes the model). Returns the matched module paths (kept on the model as
    `model.qlora_saved_modules`; `names` as `model.qlora_modules_to_save`). Raises `ConfigError` for an entry that
    matches nothing, a LoRA-wrapped or quantized module, or the embedding/head of a model that ties them (refused:
    untying would change the model peft rebuilds from the base).
    """
    names = [str(n) for n in names]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    paths: list[str] = []
    for entry in names:
        found = [p for p, _ in model.named_modules() if p and matches_module_entry(p, entry)]
        if not found:
            raise ConfigError(
                f"lora.modules_to_save entry {entry!r} matches no module of the model; name a module such as lm_head."
            )
        paths += [p for p in found if p not in paths]
    for path in paths:
        module = model.get_submodule(path)
        if tied and module in (embed, head):
            raise ConfigError(
                f"lora.modules_to_save names {path}, but this model ties its embedding and lm_head "
                "(tie_word_embeddings), which modules_to_save does not support; remove it from the list."
            )
        if any(isinstance(m, LoraLinear) for m in module.modules()):
            raise ConfigError(
                f"lora.modules_to_save names {path}, which LoRA also targets; remove it from one of the two."
            )
        params = list(module.parameters())
        if not params or not all(p.is_floating_point() and p.__class__.__name__ == "Parameter" for p in params):
            raise ConfigError(
                f"lora.modules_to_save names {path}, which is quantized or has no weights; name an unquantized module."
            )
    for path in paths:
        model.get_submodule(path).requires_grad_(True)
    model.qlora_modules_to_save = names
    model.qlora_saved_modules = paths
    return paths


def saved_modules_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole modules_to_save tensors keyed as peft saves them (adapter name stripped): `<path>.<param>`."""
    state = {}
    for path in getattr(model, "qlora_saved_modules", None) or []:
        for name, param in model.get_submodule(path).named_parameters():
            state[f"{path}.{name}"] = param
    return state


def _logical_numel(param: torch.Tensor) -> int:
    # A packed 4-bit weight stores two parameters per uint8 element (peft counts it the same way).
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted as the parameters they hold."""
    trainable = total = 0
    for param in model.parameters():
        n = _logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """peft's one-line summary: trainable params || all params || trainable%."""
    trainable, total = count_parameters(model)
    return (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    )
