"""Sequence-tiled feed-forward (`train.tiled_mlp`): each decoder layer's feed-forward norm + MLP runs over tiles of
the sequence, in the forward and again in the backward, so its [tokens, intermediate] tensors and the norm's fp32
temporaries exist for one tile at a time instead of the whole sequence.

The block is row-wise (every token's output depends on that token alone), so tiling changes no value: the input
gradient is the same product per token, and the adapters' weight gradients are sums over tokens taken tile by tile
(equal in fp32 up to the order of the additions). The forward keeps only the block's input; the backward recomputes
each tile under the forward's autocast and random state and back-propagates it at once (Unsloth's TiledMLP and
Arctic's long-sequence training do the same).

The module tree is left as it is (adapter keys and the export see the same names): the feed-forward norm's
`forward` becomes the identity and the MLP's `forward` applies norm and MLP tile by tile.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..memory.activations import tile_tokens

# The norm in front of each family's MLP: gemma2 has a pre-feed-forward norm, the others the post-attention one.
FEED_FORWARD_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm")


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _TiledBlock(torch.autograd.Function):
    """y = block(x), computed over tiles of dim 1 without keeping the block's intermediates; the backward recomputes
    each tile and back-propagates through it, accumulating the block's parameter gradients directly."""

    @staticmethod
    def forward(ctx, block: Callable, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        device = x.device
        ctx.block, ctx.tile, ctx.device = block, tile, device
        ctx.autocast = torch.is_autocast_enabled(device.type)
        ctx.autocast_dtype = torch.get_autocast_dtype(device.type)
        ctx.rng = _rng_state(device)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return _tiled(block, tile, x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x, *params) = ctx.saved_tensors
        device = ctx.device
        want_x = ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if want_x else None
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]  # the tiles' sums, rounded once at the end
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], device)
            with torch.enable_grad(), torch.autocast(device.type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
                for start in range(0, x.shape[1], ctx.tile):
                    part = x[:, start : start + ctx.tile].detach().requires_grad_(want_x)
                    out = ctx.block(part)
                    inputs = [part, *params] if want_x else params
                    found = torch.autograd.grad(out, inputs, grad_out[:, start : start + ctx.tile], allow_unused=True)
                    if want_x:
                        grad_x[:, start : start + ctx.tile] = found[0]
                        found = found[1:]
                    for total, g in zip(sums, found):
                        if g is not None:
                            total.add_(g)
                    del part, out, found
        grads = [total.to(p.dtype) for total, p in zip(sums, params)]
        return (None, None, grad_x, *grads)


def _tiled(block: Callable, tile: int, x: torch.Tensor) -> torch.Tensor:
    """block(x) tile by tile into one preallocated output."""
    first = block(x[:, :tile])
    out = first.new_empty((*x.shape[:2], *first.shape[2:]))
    out[:, :tile] = first
    del first
    for start in range(tile, x.shape[1], tile):
        out[:, start : start + tile] = block(x[:, start : start + tile])
    return out


class _TiledForward:
    """The MLP's new `forward`: its norm, then the MLP, tile by tile (short inputs run whole)."""

    def __init__(self, norm_forward: Callable, mlp: nn.Module, mlp_forward: Callable, tile: int):
        self.norm_forward, self.mlp, self.mlp_forward, self.tile = norm_forward, mlp, mlp_forward, tile

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_forward(self.norm_forward(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] <= self.tile:
            return self.block(x)
        if not torch.is_grad_enabled():
            return _tiled(self.block, self.tile, x)
        # the trainable parameters are inputs, so the backward runs even when x needs no gradient
        params = [p for p in self.mlp.parameters() if p.requires_grad]
        return _TiledBlock.apply(self.block, self.tile, x, *params)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def enable_tiled_mlp(model: nn.Module, tile: int | None = None) -> int:
    """Tile every decoder layer's feed-forward norm + MLP over the sequence (in place); return the layers tiled.

    `tile` defaults to `tile_tokens(hidden_size)`. Layers without an `mlp` and a norm in front of it are left alone.
    """
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    tile = tile or tile_tokens(getattr(text, "hidden_size", 256))
    count = 0
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        norm_name = next((n for n in FEED_FORWARD_NORMS if isinstance(getattr(layer, n, None), nn.Module)), None)
        if not isinstance(mlp, nn.Module) or norm_name is None or isinstance(mlp.forward, _TiledForward):
            continue
        norm = getattr(layer, norm_name)
        mlp.forward = _TiledForward(norm.forward, mlp, mlp.forward, tile)
        norm.forward = _identity
        count += 1
    return count


def disable_tiled_mlp(model: nn.Module) -> None:
    """Undo `enable_tiled_mlp`: the norms and MLPs run their own forward again."""
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module) and isinstance(mlp.__dict__.get("forward"), _TiledForward):
            del mlp.forward
            for name in FEED_FORWARD_NORMS:
                norm = getattr(layer, name, None)
                if isinstance(norm, nn.Module) and norm.__dict__.get("forward") is _identity:
                    del norm.forward
                    break
