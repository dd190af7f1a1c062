"""Activation (gradient) checkpointing of the decoder layers, through transformers' public API where the
installed version has it."""

from __future__ import annotations

import inspect

import torch

from ..errors import ConfigError


def _checkpoint_function(offload: bool):
    """torch's non-reentrant checkpoint, optionally holding the saved layer inputs in (pinned) CPU memory."""
    from torch.utils.checkpoint import checkpoint

    def checkpoint_layer(function, *args, **kwargs):
        kwargs.setdefault("use_reentrant", False)
        if not offload:
            return checkpoint(function, *args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(function, *args, **kwargs)

    return checkpoint_layer


def enable_gradient_checkpointing(model: torch.nn.Module, offload: bool = False) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so gradients reach the adapters of a frozen base).

    With `offload`, the one tensor each checkpointed layer keeps (its input) is held in pinned CPU memory and
    copied back for the recompute: it frees layers x tokens x hidden bf16 bytes of GPU memory, which dominates at
    long sequences, for a copy each way per layer.

    transformers >= 5 offers `activation_checkpointing_enable(offload=...)`; 4.x offers
    `gradient_checkpointing_enable` without offload. Offload on 4.x sets our checkpoint function on the layers
    the way transformers itself does (`_set_gradient_checkpointing`).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} does not support gradient checkpointing; set train.gradient_checkpointing: false."
        )
    kwargs = {"use_reentrant": False}
    modern = getattr(model, "activation_checkpointing_enable", None)
    has_offload = modern is not None and "offload" in inspect.signature(modern).parameters
    # transformers pins the offloaded tensors, which needs an accelerator: on a CPU-only machine, ours does not pin
    if has_offload and (not offload or torch.cuda.is_available()):
        modern(activation_checkpointing_kwargs=kwargs, offload=offload)
    elif not offload:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:  # offload without the public switch, or on a CPU-only machine (no pinned memory to offload into)
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=_checkpoint_function(offload))
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
