"""Regional `torch.compile` of the decoder layers (`train.compile`).

Each decoder layer's `__call__` is compiled in place (`nn.Module.compile`: the module tree, the parameter names and
so the adapter keys stay as they are). Every layer of a class runs the same code, and dynamo treats a layer's
parameters (the 4-bit `Params4bit` and their quantization state included) as graph inputs, so one graph is traced
and compiled for the first layer and reused by all the others: compile time is one layer's, not the model's.

What runs inside the compiled region, without graph breaks (measured with `torch._dynamo.explain`, torch 2.13,
transformers 5, bitsandbytes 0.50): bitsandbytes' `Linear4bit` (and `Linear8bitLt`) forward and backward (their
ops carry fake kernels), `LoraLinear`, bf16 autocast, the packed rows' positions and block-diagonal mask, and
transformers' non-reentrant activation checkpointing: transformers wraps each layer's `forward` in its checkpoint
call, and dynamo traces `torch.utils.checkpoint.checkpoint` itself, so the compiled graph recomputes the layer in
backward the same way (each layer still keeps only its input).

Inductor rounds to bf16 wherever eager autocast does (`emulate_precision_casts`, no measurable cost): on the CPU
the tests' tiny model (hidden 64) gets eager's loss and adapter gradients bit for bit, and at hidden 512 the loss
agrees within 1e-5 relative and the gradients within a bf16 rounding (fp32 sums in another order).
On the CPU (tools/bench.py --compile, llama-small) the steady step is 0-12% faster, for ~20 s of compiling with an
empty inductor cache (~5 s with a warm one): it pays only over long runs; measure it on the GPU before relying on it.

Extra compiles to expect, each once per run: without checkpointing the first layer's input needs no gradient and the
others' do (two graphs; checkpointing makes the embedding output require gradients, so one); the eval pass (no_grad,
eval mode: up to two graphs); a second sequence length (dynamo then compiles one graph with a symbolic length).

Refused, with a `ConfigError`: the tiled MLP (its autograd function reads the RNG state, a graph break that leaves
every checkpointed layer eager), activation offload (the saved-tensor hooks around the checkpoint are a graph break,
and eager checkpointing turns dynamo off inside it, so nothing would compile) and FSDP-sharded layers (not tried).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import decoder_layers
from .tiled_mlp import _TiledForward

# inductor's config for the compiled layers: round to bf16 where eager autocast does, so values match eager
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def inductor_unavailable(device: torch.device | str) -> str | None:
    """Why torch.compile's default backend (inductor) cannot compile for `device` here, or None when it can."""
    device = torch.device(device)
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile needs Triton on CUDA (pip install triton)"
    if device.type != "cpu":
        return f"torch.compile is not set up for {device.type} devices here"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an import that fails on this platform
        return "torch.compile on the CPU needs a C++ compiler (install g++, or set CXX to one)"
    return None


def _is_torch_checkpoint(function) -> bool:
    """Whether a layer's checkpoint function is torch's own (as transformers sets it without offload), which dynamo
    traces into the compiled graph."""
    from torch.utils.checkpoint import checkpoint

    while isinstance(function, functools.partial):
        function = function.func
    return function is checkpoint


def _refusal(model: nn.Module, layers: list[nn.Module]) -> str | None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _TiledForward):
            return (
                "train.compile and train.tiled_mlp cannot be combined (the tiled MLP is a graph break that leaves "
                "every layer uncompiled); turn one of them off."
            )
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False) and not _is_torch_checkpoint(
            getattr(layer, "_gradient_checkpointing_func", None)
        ):
            return (
                "train.compile and train.offload_activations cannot be combined (the offload hooks around each "
                "checkpointed layer stop torch.compile, so nothing would compile); turn one of them off."
            )
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return "train.compile does not run under train.fsdp yet; turn one of them off."
    return None


def compile_decoder_layers(model: nn.Module, *, backend: str = "inductor", options: dict | None = None) -> int:
    """Compile each decoder layer's forward regionally, in place; return how many layers.

    Call it on the finished model: after LoRA, `enable_gradient_checkpointing` and the tiled-MLP decision, so the
    refusals below see them (compiling is lazy: the first forward traces and compiles). Raises `ConfigError` for a
    model with no decoder layers, for tiled MLPs, offloaded activations or FSDP-sharded layers, and, with inductor,
    when this machine cannot compile for the model's device (no C++ compiler on the CPU, no Triton on CUDA).
    `backend` and `options` go to `torch.compile` (`options` defaults to `INDUCTOR_OPTIONS` for inductor).
    """
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"train.compile found no decoder layers in {type(model).__name__}; set train.compile: false.")
    refusal = _refusal(model, layers)
    if refusal:
        raise ConfigError(refusal)
    if backend == "inductor":
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        reason = inductor_unavailable(device)
        if reason:
            raise ConfigError(f"{reason}; or set train.compile: false.")
        options = dict(INDUCTOR_OPTIONS) if options is None else options
    kwargs = {} if options is None else {"options": options}
    for layer in layers:
        layer.compile(backend=backend, **kwargs)
    return len(layers)
