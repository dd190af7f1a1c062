"""Activation (gradient) checkpointing of the decoder layers, through transformers' public API where the
installed version has it."""

from __future__ import annotations

import weakref

import torch

from ..errors import ConfigError

OFFLOAD_MIN_BYTES = 1 << 16  # smaller saved tensors (positions, rotary tables) are not worth a copy each way


class _Offloaded:
    """One saved tensor held in CPU memory, and its copy back while it is on its way."""

    def __init__(self, key: int, host: torch.Tensor, device: torch.device):
        self.key, self.host, self.device = key, host, device
        self.back: torch.Tensor | None = None  # the copy back to the device, once started
        self.event = None  # the side stream's event for that copy


class OffloadedActivations:
    """Saved-tensor hooks that keep each checkpointed layer's saved input in CPU memory, copied on a side CUDA
    stream so the copies overlap the compute (transformers' own offload copies on the compute stream).

    Forward: the copy to pinned host memory waits for the tensor on the side stream, and the GPU block is kept from
    reuse until it is done (`record_stream`). Backward unpacks the layers in reverse order; unpacking layer k starts
    the copy back of layer k - 1, so it arrives while layer k is recomputed. Without CUDA the copies are plain
    (the bookkeeping is the same, which is what the CPU tests check). Autograd owns the packed handles, so what a
    freed graph held is freed with it.
    """

    def __init__(self, device: torch.device | None = None):
        cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.handles: weakref.WeakValueDictionary[int, _Offloaded] = weakref.WeakValueDictionary()
        self.next_key = 0

    def pack(self, tensor: torch.Tensor):
        small = tensor.numel() * tensor.element_size() < OFFLOAD_MIN_BYTES
        if small or (self.stream is not None and tensor.device.type != "cuda"):
            return tensor
        key, self.next_key = self.next_key, self.next_key + 1
        if self.stream is None:
            handle = _Offloaded(key, tensor.detach().to("cpu", copy=True), tensor.device)
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # its block is not reused before the copy has read it
            handle = _Offloaded(key, host, tensor.device)
        self.handles[key] = handle
        return handle

    def _fetch(self, handle: _Offloaded) -> None:
        if handle.back is not None:
            return
        if self.stream is None:
            handle.back = handle.host.to(handle.device)
            return
        with torch.cuda.stream(self.stream):
            handle.back = handle.host.to(handle.device, non_blocking=True)
            handle.event = self.stream.record_event()

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        self._fetch(packed)
        before = self.handles.get(packed.key - 1)
        if before is not None:  # the layer before is the next to be recomputed
            self._fetch(before)
        tensor, event = packed.back, packed.event
        packed.back = packed.event = None  # the caller holds it now; a second unpack copies it again
        if event is not None:
            current = torch.cuda.current_stream(tensor.device)
            current.wait_event(event)
            tensor.record_stream(current)
        return tensor

    def hooks(self):
        """The context that applies these hooks to what autograd saves inside it."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _checkpoint_function(offload: bool, device: torch.device | None = None):
    """torch's non-reentrant checkpoint, optionally holding the saved layer inputs in CPU memory
    (`OffloadedActivations`: copied on a side stream on CUDA)."""
    from torch.utils.checkpoint import checkpoint

    offloaded = OffloadedActivations(device) if offload else None

    def checkpoint_layer(function, *args, **kwargs):
        kwargs.setdefault("use_reentrant", False)
        if offloaded is None:
            return checkpoint(function, *args, **kwargs)
        with offloaded.hooks():
            return checkpoint(function, *args, **kwargs)

    checkpoint_layer.offloaded = offloaded
    return checkpoint_layer


def enable_gradient_checkpointing(model: torch.nn.Module, offload: bool = False, every: int = 1) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so gradients reach the adapters of a frozen base).

    `every` > 1 is selective recompute: only layers 0, every, 2 * every, ... are checkpointed; the others keep their
    activations from the forward, so the backward recomputes a 1 / every share of the layers (faster, and more
    memory, which `qlora-lite memory --checkpoint-every` predicts). It switches checkpointing off on the other layers
    through transformers' per-layer flag (`GradientCheckpointingLayer.gradient_checkpointing`).

    With `offload`, the one tensor each checkpointed layer keeps (its input) is held in pinned CPU memory and
    copied back for the recompute: it frees layers x tokens x hidden bf16 bytes of GPU memory, which dominates at
    long sequences, for a copy each way per layer.

    Without offload this is transformers' public `activation_checkpointing_enable` (5.x) or
    `gradient_checkpointing_enable` (4.x). With offload it sets our checkpoint function on the layers the way
    transformers itself does (`_set_gradient_checkpointing`), with `OffloadedActivations` copying on a side stream.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} does not support gradient checkpointing; set train.gradient_checkpointing: false."
        )
    kwargs = {"use_reentrant": False}
    modern = getattr(model, "activation_checkpointing_enable", None)
    if not offload and modern is not None:
        modern(activation_checkpointing_kwargs=kwargs)
    elif not offload:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:  # ours: transformers' offload copies on the compute stream, ours on a side stream that overlaps it
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=_checkpoint_function(offload, device)
        )
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if every > 1:
        _checkpoint_every(model, every)


def _checkpoint_every(model: torch.nn.Module, every: int) -> None:
    from ..model.targets import decoder_layers

    layers = decoder_layers(model)
    if not layers or not all(isinstance(getattr(layer, "gradient_checkpointing", None), bool) for layer in layers):
        import transformers

        raise ConfigError(
            f"train.checkpoint_every needs decoder layers that checkpoint themselves, which {type(model).__name__} "
            f"under transformers {transformers.__version__} does not have; upgrade transformers, or set "
            "train.checkpoint_every: 1."
        )
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
