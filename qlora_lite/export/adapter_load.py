"""Loading a saved adapter onto a model: LoRA (or DoRA) layers created to the adapter's config, its weights copied
in, new-token rows and modules trained whole restored; and the base quantized exactly as the adapter records, with
the adapter on top (what `verify` compares against and `chat` talks to)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config.settings import QuantConfig
from ..errors import AdapterError, ConfigError
from ..model.embeddings import apply_trainable_tokens, resize_embeddings, token_state_dict
from ..model.lora import (
    adapter_state_dict,
    apply_lora,
    apply_modules_to_save,
    lora_layers,
    lora_scaling,
    saved_modules_state_dict,
)
from .adapter import (
    _check_model,
    _module_key,
    _pattern_value,
    _stored_adapter_dtype,
    adapter_quant_settings,
    adapter_quantized_modules,
    read_adapter,
    read_adapter_config,
)  # fmt: skip
from .adapter_config import QLORA_KEY


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a PEFT-format LoRA adapter (DoRA included) into `model`, applying LoRA first if the model has none.

    LoRA applied here keeps the file's precision: bf16 adapters stay bf16, fp32 (peft's default) stay fp32.
    Returns the model in eval mode, as peft's `PeftModel.from_pretrained` does, so the adapter's dropout is off;
    call `model.train()` to train it further. Raises `AdapterError` for a non-model, a missing or malformed
    adapter, one whose tensors do not fit the config or the model, or a DoRA adapter for a model with plain LoRA
    layers (and the other way round).
    """
    _check_model(model, "load_adapter")
    config, weights = read_adapter(adapter_dir)
    tensors = {_module_key(key): weights.read(key) for key in weights.keys()}
    if getattr(model, "qlora_lora", None) is None:
        if config.get("rank_pattern"):
            raise AdapterError(
                f"the adapter in {adapter_dir} gives layers their own ranks (rank_pattern), which load_adapter does not support; "
                "merge it with export_merged instead."
            )
        targets = config["target_modules"]
        apply_lora(
            model,
            r=config["r"],
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=targets if isinstance(targets, str) else list(targets),
            rslora=bool(config.get("use_rslora")),
            adapter_dtype=_stored_adapter_dtype(tensors),
            use_dora=bool(config.get("use_dora")),
        )
    _check_same_variant(model, config, adapter_dir)
    if config.get("trainable_token_indices") and getattr(model, "qlora_tokens", None) is None:
        _apply_saved_tokens(model, config, adapter_dir)
    if config.get("modules_to_save") and getattr(model, "qlora_modules_to_save", None) is None:
        _apply_saved_modules(model, config, adapter_dir)
    own = {**adapter_state_dict(model), **token_state_dict(model), **saved_modules_state_dict(model)}
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise AdapterError(
            f"adapter tensor {unexpected[0]!r} has no matching LoRA layer in this model; the adapter was trained on a different base."
        )
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise AdapterError(
            f"the adapter in {adapter_dir} lacks {missing[0]!r}; it does not cover this model's LoRA layers."
        )
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
    return model.eval()


def _check_same_variant(model: nn.Module, config: dict, adapter_dir: str | Path) -> None:
    """Refuse a DoRA adapter for a model with plain LoRA layers, and the other way round."""
    ours, theirs = model.qlora_lora.config.use_dora, bool(config.get("use_dora"))
    if ours != theirs:
        kinds = {True: "DoRA", False: "plain LoRA"}
        raise AdapterError(
            f"the adapter in {adapter_dir} is a {kinds[theirs]} adapter (use_dora {str(theirs).lower()}) but this model "
            f"has {kinds[ours]} layers; load it into a fresh base model."
        )


def _apply_saved_tokens(model: nn.Module, config: dict, adapter_dir: str | Path) -> None:
    """Grow the base to the adapter's recorded size (mean rows, as training did) and wrap its trainable rows."""
    spec = config["trainable_token_indices"]
    indices = spec if isinstance(spec, list) else spec.get("embed_tokens") or next(iter(spec.values()))
    record = config.get(QLORA_KEY) or {}
    rows = max(int(record.get("vocab_size") or 0), max(indices) + 1)
    resize_embeddings(model, rows)
    if isinstance(spec, dict) and any(sorted(v) != sorted(indices) for v in spec.values()):
        raise AdapterError(
            f"the adapter in {adapter_dir} trains different token rows in different modules, which load_adapter "
            "does not support; give embed_tokens and lm_head the same trainable_token_indices."
        )
    apply_trainable_tokens(model, indices)


def _apply_saved_modules(model: nn.Module, config: dict, adapter_dir: str | Path) -> None:
    """Grow the base to the recorded vocabulary and make the modules_to_save trainable, as training did."""
    resize_embeddings(model, int((config.get(QLORA_KEY) or {}).get("vocab_size") or 0))
    try:
        apply_modules_to_save(model, list(config["modules_to_save"]))
    except ConfigError as exc:
        raise AdapterError(f"the adapter in {adapter_dir} cannot be loaded: {str(exc).rstrip('.')}.") from None


def _apply_patterns(model: nn.Module, config: dict) -> None:
    # peft adapters may give some layers their own alpha; the scaling follows the file, as in peft.
    if not config.get("alpha_pattern") and not config.get("rank_pattern"):
        return
    for name, layer in lora_layers(model).items():
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
        layer.scaling = lora_scaling(layer.r, alpha, bool(config.get("use_rslora")))


def load_base_with_adapter(
    base: str | Path, adapter_dir: str | Path, device: str | torch.device | None = None, trust_remote_code: bool = False
) -> tuple[nn.Module, QuantConfig]:
    """The base quantized exactly as the adapter records (settings and quantized modules), with the adapter loaded
    on top, in eval mode; and those quantization settings. What `verify` compares against and `chat` talks to."""
    from ..model.loader import load_quantized

    config = read_adapter_config(adapter_dir)
    settings, _ = adapter_quant_settings(config)
    targets = adapter_quantized_modules(config) or config["target_modules"]
    model, _ = load_quantized(
        base, bits=settings.bits, quant_type=settings.quant_type, double_quant=settings.double_quant, device=device,
        target_modules=targets, blocksize=settings.blocksize, int8_threshold=settings.int8_threshold,
        trust_remote_code=trust_remote_code, load_tokenizer=False,
    )  # fmt: skip
    return load_adapter(model, adapter_dir), settings
