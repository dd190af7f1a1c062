"""The transient bytes beside the stored activations during a micro-batch: a weight dequantized for its matmul, the
quantized base's forward temporaries, and the working set of one layer's forward and backward (recomputed under
checkpointing, over sequence tiles with the tiled MLP). What autograd keeps: `memory.activations`; how they add up to
a peak: `memory.report`.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .activations import ActivationModel, attention_mode, layer_activations, tile_of
from .constants import BF16, FP32
from .inventory import Inventory, LinearInfo
from .settings import RunSettings


def dequant_bytes(t: LinearInfo, s: RunSettings) -> int:
    """Temporary bytes to dequantize one weight: bf16 [out, in] (+ fp32 absmax when double-quantized)."""
    dense = BF16 * t.out_features * t.in_features  # bitsandbytes dequantize_4bit / CB * SCB / 127 in bf16
    if s.bits == 4 and s.double_quant:
        dense += FP32 * math.ceil(t.out_features * t.in_features / s.blocksize)  # nested absmax dequantized to fp32
    return dense


def forward_base_temp(t: LinearInfo, s: RunSettings) -> int:
    """Bytes the quantized base of one layer holds while it runs forward, beyond its bf16 output."""
    if s.bits == 8 and s.device == "cuda":
        # MatMul8bitLt: int8 copy of the input, int32 matmul result and its fp16 dequantized copy
        return (t.in_features + (FP32 + BF16) * t.out_features) * s.tokens
    # bitsandbytes gemm_4bit on CUDA dequantizes + F.linear above 1536 rows (and may below, per GPU);
    # MatMul8bitFp (CPU) multiplies by the dequantized CB
    return dequant_bytes(t, s)


RMSNORM_BACKWARD = 5 * FP32  # autograd of the fp32 RMSNorm: grad.float(), grad*rstd, grad*x, x^1 * 2, their product


def _up_projection(inv: Inventory, targets: list[LinearInfo], s: RunSettings, tokens: int) -> tuple[int, int]:
    """(bytes, dequantization part) the up (gate_up) projection's LoraLinear holds while it runs on `tokens`: base
    output, lora_B output and the scaled update (3 x its out_features), or the base output while the base still
    holds its dequantized weight / int8 temporaries."""
    wide = max(targets, key=lambda t: t.out_features * t.in_features) if targets else None
    dq_fwd = forward_base_temp(wide, replace(s, seq_len=tokens, batch_size=1)) if wide else 0
    width = 2 * inv.intermediate if inv.arch.fused_gate_up else inv.intermediate
    return max((BF16 * 3 * width * tokens, 0), (BF16 * width * tokens, dq_fwd), key=sum)


def _layer_reference(inv: Inventory, targets: list[LinearInfo]) -> list[LinearInfo]:
    """The targets of the decoder layer that has the most (the layer the working sets are computed for)."""
    by_layer: dict[int, list[LinearInfo]] = {}
    for t in targets:
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    return max(by_layer.values(), key=len) if by_layer else []


def _tiled_working_sets(
    inv: Inventory, targets: list[LinearInfo], acts: ActivationModel, s: RunSettings
) -> dict[str, tuple[int, int]]:
    """`working_sets` with the tiled MLP: the feed-forward norm + MLP's tensors exist for one tile of `tile_of`
    tokens; the whole sequence's block output, input gradient and the residual sum exist once."""
    T, c, h, i = s.tokens, tile_of(inv, s), inv.hidden, inv.intermediate
    q, kv = inv.heads * inv.head_dim, inv.kv_heads * inv.head_dim
    ckpt, fused, gated = s.gradient_checkpointing, inv.arch.fused_gate_up, inv.arch.gated_mlp
    untiled = layer_activations(inv, _layer_reference(inv, targets), replace(s, tiled_mlp=False), first=False)
    m, nrm = untiled.mlp_per_token, untiled.norm_per_token
    wide = max(targets, key=lambda t: t.out_features * t.in_features) if targets else None
    dq_bwd = dequant_bytes(wide, s) if wide else 0
    transient = _up_projection(inv, targets, s, c)
    mlp_in = any(t.role == "mlp_in" for t in targets) and s.lora_dropout == 0
    partial = BF16 * h * mlp_in + (BF16 * 2 * i if gated and not fused else 0)
    not_yet = BF16 * i * c if s.bits == 8 and any(t.role == "mlp_out" for t in targets) else 0
    # one tile's forward: its norm output (and, unfused, the activation output) beside the up projection
    tile_live = BF16 * h * c + (BF16 * i * c if gated and not fused else 0) + transient[0] - not_yet
    block_out, grad_in = BF16 * h * T, BF16 * h * T  # the preallocated block output; the layer output's gradient
    residual = BF16 * h * T if ckpt else 0  # the block's input (the residual); stored when not checkpointing
    forward = (block_out + residual + max(tile_live, 0), transient[1])
    if attention_mode(inv, s) == "eager":
        probs = BF16 + FP32 + (FP32 + BF16 + (BF16 if inv.arch.attn_softcap else 0) if ckpt else FP32)
        forward = max(forward, (probs * inv.heads * s.batch_size * s.seq_len**2, 0), key=sum)
    saved = acts.full_layer.at(s.batch_size, s.seq_len)
    recompute = saved if ckpt else 0
    product_saved = any(t.role == "mlp_out" for t in targets) and s.lora_dropout == 0
    extra = 0 if product_saved else BF16 * i * c
    mlp = max((BF16 * 2 * i * c, 0), (BF16 * i * c, dq_bwd), key=sum)
    # inside the block's backward, one tile at a time: its recomputed forward, the MLP's backward, the norm's
    tile = {
        "mlp": ((nrm + m) * c + extra + mlp[0], mlp[1]),
        "norm": (nrm * c + 2 * BF16 * h * c + RMSNORM_BACKWARD * h * c, 0),
        "forward": (nrm * c + partial * c + transient[0], transient[1]),
    }
    sums = FP32 * sum(
        s.rank * (t.in_features + t.out_features)
        for t in _layer_reference(inv, targets)
        if t.role in ("mlp_in", "mlp_out")
    )
    worst = max(tile.values(), key=sum)
    candidates = {"tiled_mlp": (recompute + grad_in + BF16 * h * T + sums + worst[0], worst[1])}
    if ckpt:  # the layer's recomputation, at a tile's up projection (the block runs without grad there)
        candidates["recompute"] = (recompute + grad_in + block_out + max(tile_live, 0), transient[1])
    after_mlp = recompute - acts.full_layer.mlp_per_token * T
    candidates["residual"] = (after_mlp + 3 * BF16 * h * T, 0)  # output gradient + block input gradient + their sum
    attn = after_mlp + grad_in + BF16 * (q + 2 * kv) * T  # dq, dk, dv
    if attention_mode(inv, s) == "flash":
        attn += (FP32 * q + (2 * BF16 * q if kv != q else 0)) * T if s.device == "cuda" else 0
    else:
        attn += (2 * FP32 + BF16) * inv.heads * s.batch_size * s.seq_len**2
    candidates["attention"] = (attn, 0)
    # the input norm, once the rest of the layer's saved tensors are freed
    candidates["norm"] = (recompute - saved + nrm * T + 2 * grad_in + RMSNORM_BACKWARD * h * T, 0)
    candidates["final_norm"] = (acts.final_norm + grad_in + RMSNORM_BACKWARD * h * T, 0)
    return {"forward": forward, "backward": max(candidates.values(), key=sum)}


def working_sets(
    inv: Inventory, targets: list[LinearInfo], acts: ActivationModel, s: RunSettings
) -> dict[str, tuple[int, int]]:
    """{phase: (working set, dequantization part)}: bytes beyond the stored activations at each phase's worst moment.

    With offloaded activations on CUDA, the next layer's input is copied back while a layer is recomputed
    (`training.checkpointing.OffloadedActivations`), so the backward holds one more layer input.
    """
    sets = _tiled_working_sets(inv, targets, acts, s) if s.tiled_mlp else _mixed_working_sets(inv, targets, acts, s)
    if s.offload_activations and s.gradient_checkpointing and s.device == "cuda":
        work, dequant = sets["backward"]
        sets["backward"] = (work + BF16 * inv.hidden * s.tokens, dequant)
    return sets


def _mixed_working_sets(
    inv: Inventory, targets: list[LinearInfo], acts: ActivationModel, s: RunSettings
) -> dict[str, tuple[int, int]]:
    """The working sets when layers differ (`checkpoint_every` > 1): each kind of layer (checkpointed or not) at
    its last layer, where the layers after it have stored (forward) or already freed (backward) their bytes."""
    kinds = sorted(set(acts.checkpointed)) or [s.gradient_checkpointing]
    forward, backward = [], []
    for kind in kinds:
        last = max((k for k, c in enumerate(acts.checkpointed) if c == kind), default=inv.layers - 1)
        after = sum(acts.layer_stored[last + 1 :])
        sets = _working_sets(inv, targets, acts, s, kind)
        forward.append((sets["forward"][0] - after, sets["forward"][1]))
        backward.append((sets["backward"][0] - after, sets["backward"][1]))
        final_norm = sets["final_norm"]
    return {"forward": max(forward, key=sum), "backward": max(*backward, final_norm, key=sum)}


def _working_sets(
    inv: Inventory, targets: list[LinearInfo], acts: ActivationModel, s: RunSettings, ckpt: bool
) -> dict[str, tuple[int, int]]:
    """{forward, backward, final_norm}: (bytes beyond the stored activations, dequantization part) of the last decoder
    layer, checkpointed (`ckpt`) or not, and of the final norm's backward."""
    T, h, i = s.tokens, inv.hidden, inv.intermediate
    q, kv = inv.heads * inv.head_dim, inv.kv_heads * inv.head_dim
    wide = max(targets, key=lambda t: t.out_features * t.in_features) if targets else None
    dq_fwd = forward_base_temp(wide, s) if wide else 0
    dq_bwd = dequant_bytes(wide, s) if wide else 0
    full = acts.full_layer
    saved = full.at(s.batch_size, s.seq_len)
    # forward: the up projection's LoraLinear holds base output, lora_B output and the scaled update (3 x its
    # out_features), or the base output while the base still holds its dequantized weight / int8 temporaries
    fused = inv.arch.fused_gate_up
    width = 2 * i if fused else i  # out_features of the up (gate_up) projection
    up_lora, up_base = (BF16 * 3 * width * T, 0), (BF16 * width * T, dq_fwd)
    transient = max(up_lora, up_base, key=sum)
    mlp_in = any(t.role == "mlp_in" for t in targets) and s.lora_dropout == 0
    # MLP tensors already saved when the up projection runs: norm output (kept by LoRA), gate output and activation
    partial = BF16 * h * mlp_in + (BF16 * 2 * i if inv.arch.gated_mlp and not fused else 0)
    rest = full.mlp_per_token - partial  # MLP tensors saved only after the up projection has run
    residual = BF16 * h * T  # the residual stream after attention, alive (not saved) through the MLP
    if ckpt:
        # nothing is saved: alive are the residual, the norm output and (unfused) the activation output; the 8-bit
        # down projection's input, counted in the stored total, does not exist yet
        live = residual + BF16 * h * T + (BF16 * i * T if inv.arch.gated_mlp and not fused else 0)
        not_yet = BF16 * i * T if s.bits == 8 and any(t.role == "mlp_out" for t in targets) else 0
        forward = (max(live + transient[0] - not_yet, 0), transient[1])
    else:
        forward = (max(residual + transient[0] - rest * T, 0), transient[1])  # the stored total counts the whole layer
    if attention_mode(inv, s) == "eager":
        # scores (bf16), their fp32 copy and the fp32 softmax; under checkpointing the saved probabilities are transient too
        probs = BF16 + FP32 + (FP32 + BF16 + (BF16 if inv.arch.attn_softcap else 0) if ckpt else FP32)
        forward = max(forward, (probs * inv.heads * s.batch_size * s.seq_len**2, 0), key=sum)
    # backward of the last layer; with checkpointing its saved tensors are first recomputed on top of the stored ones
    recompute = saved if ckpt else 0
    grad_in = BF16 * h * T  # gradient of the layer output, also kept for the residual branch
    product_saved = any(t.role == "mlp_out" for t in targets) and s.lora_dropout == 0
    # the product's gradient (inter) takes the place of the saved product, freed by lora_A's backward; when
    # down_proj has no LoRA the product was never saved and its gradient comes on top
    extra = 0 if product_saved else BF16 * i * T
    # then either the base's input gradient while its weight is dequantized, or the gated product's backward:
    # gradients of the activation output and of up (2 x inter)
    mlp = max((BF16 * 2 * i * T, 0), (BF16 * i * T, dq_bwd), key=sum)
    candidates = {"mlp": (recompute + grad_in + extra + mlp[0], mlp[1])}
    if ckpt:  # the recomputation itself, at the up projection (as in the forward)
        candidates["recompute"] = (recompute - rest * T + grad_in + residual + transient[0], transient[1])
    after_mlp = recompute - full.mlp_per_token * T
    # RMSNorm backward in fp32 (five [tokens, hidden] fp32 temporaries) with the residual and norm-output grads
    candidates["norm"] = (after_mlp + 2 * grad_in + RMSNORM_BACKWARD * h * T, 0)
    attn = after_mlp - full.norm_per_token * T + grad_in + BF16 * (q + 2 * kv) * T  # dq, dk, dv
    if attention_mode(inv, s) == "flash":
        attn += (
            (FP32 * q + (2 * BF16 * q if kv != q else 0)) * T if s.device == "cuda" else 0
        )  # FA2 fp32 dq accumulator, GQA dk/dv
    else:
        attn += (
            (2 * FP32 + BF16) * inv.heads * s.batch_size * s.seq_len**2
        )  # softmax backward: fp32 grads in/out + bf16
    candidates["attention"] = (attn, 0)
    final_norm = (acts.final_norm + grad_in + RMSNORM_BACKWARD * h * T, 0)
    backward = max(candidates.values(), key=sum)
    return {"forward": forward, "backward": backward, "final_norm": final_norm}
