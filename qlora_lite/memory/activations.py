"""What autograd keeps and what runs beside it during a micro-batch: each decoder layer's saved tensors, the
activation model of the whole stack, attention masks, the loss's logits, and the transient working sets
(dequantized weights, forward temporaries, one layer's backward).

The saved tensors follow the autograd rules of the code that runs (transformers' decoder layers, our LoRA
layer, bitsandbytes' matmul functions), in the style of Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (per-layer bytes per token), adapted to RMSNorm, SwiGLU/GeGLU,
grouped-query attention with a fused (flash) kernel, bf16 and LoRA; tests check the stored activations
byte for byte on the CPU with `memory.probe.AllocationTracker`. How these add up to a peak: `memory.report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .constants import BF16, FP32
from .inventory import Inventory, LinearInfo
from .settings import RunSettings


def tile_tokens(hidden_size: int) -> int:
    """Sequence positions per tile of the tiled MLP (`train.tiled_mlp`): the hidden size, at least 256, so a tile's
    [tokens, intermediate] tensors are about as large as the layer's [tokens, hidden] input at any length."""
    return max(256, int(hidden_size))


def tile_of(inv: Inventory, s: RunSettings) -> int:
    """Tokens per tile of the tiled MLP for this micro-batch (the whole micro-batch when it is one tile)."""
    positions = s.tile_tokens or tile_tokens(inv.hidden)
    return s.batch_size * min(positions, s.seq_len)


@dataclass(frozen=True)
class LayerActivations:
    """Saved bytes of one decoder layer: `per_token` scales with batch*seq, `per_square` with batch*seq^2.

    `mlp_per_token` is the MLP's share of `per_token` (freed once the MLP's backward is done) and
    `norm_per_token` what one norm keeps; the backward working-set model needs both.
    """

    per_token: int
    per_square: int = 0  # bytes per (batch * seq_len^2): eager attention's probabilities
    constant: int = 0
    mlp_per_token: int = 0
    norm_per_token: int = 0

    def at(self, batch: int, seq: int) -> int:
        """Bytes for a micro-batch of `batch` sequences of `seq` tokens."""
        return self.per_token * batch * seq + self.per_square * batch * seq * seq + self.constant


def _role_input_bytes(role: str, inv: Inventory, in_features: int) -> int:
    # The tensor a LoRA A (or an 8-bit base) holds for backward: the norm output (hidden), the attention
    # output (heads * head_dim), the gated product (intermediate), bf16.
    q = inv.heads * inv.head_dim
    return BF16 * {"attn_in": inv.hidden, "mlp_in": inv.hidden, "attn_out": q, "mlp_out": inv.intermediate}.get(
        role, in_features
    )


def attention_mode(inv: Inventory, s: RunSettings) -> str:
    """ "eager" (attention probabilities materialized) or "flash" (a fused kernel: sdpa, flash_attention_2)."""
    impl = s.attn_implementation or inv.attn_implementation
    return "eager" if impl == "eager" else "flash"


def sdpa_masked(inv: Inventory, s: RunSettings) -> bool:
    """Whether SDPA gets an explicit attention mask (padded micro-batches, or a sliding window shorter than seq_len)."""
    # transformers passes no mask to SDPA (is_causal) unless the batch is padded or a sliding window is shorter
    # than the sequence; with a mask SDPA runs the memory-efficient kernel, with K/V repeated to every head
    return s.padded or (inv.sliding_window is not None and s.seq_len > inv.sliding_window)


def _lora_saved(inv: Inventory, layer_targets: list[LinearInfo], s: RunSettings, mode: str) -> int:
    """Bytes per token the LoRA layers of `layer_targets` keep (their inputs and [tokens, r] intermediates)."""
    per_token = BF16 * s.rank * len(layer_targets)  # lora_B keeps its input, the [tokens, r] output of lora_A
    if s.use_dora:  # DoRA's magnitude gradient needs the base and the LoRA outputs, [tokens, out] each
        per_token += sum(2 * BF16 * t.out_features for t in layer_targets)
    if s.lora_dropout > 0:
        return per_token + sum(3 * t.in_features for t in layer_targets)  # per LoRA: bf16 dropout output + bool mask
    if s.adapter_dtype == "float32":  # each LoRA keeps its own bf16 autocast copy of its fp32 input
        return per_token + sum(BF16 * t.in_features for t in layer_targets)
    roles = {t.role for t in layer_targets if not (t.role == "attn_out" and mode == "flash")}  # flash keeps O anyway
    # lora_A keeps its input for the weight gradient; layers reading the same tensor (q/k/v, gate/up) share it
    return per_token + sum(
        _role_input_bytes(r, inv, next(t.in_features for t in layer_targets if t.role == r)) for r in roles
    )


def layer_activations(inv: Inventory, layer_targets: list[LinearInfo], s: RunSettings, first: bool) -> LayerActivations:
    """Bytes autograd keeps for one decoder layer without checkpointing (Korthikanti et al. 2022, sec. 4.1, adapted).

    Every term is a tensor the backward of the op that made it needs, as the code runs in bf16 on
    transformers' modules, our `LoraLinear` and bitsandbytes' matmul functions.
    """
    h, i, a, d = inv.hidden, inv.intermediate, inv.heads, inv.head_dim
    q, kv = a * d, inv.kv_heads * d
    arch, mode = inv.arch, attention_mode(inv, s)
    mlp_targets = [t for t in layer_targets if t.role in ("mlp_in", "mlp_out")]
    attn_targets = [t for t in layer_targets if t not in mlp_targets]
    norm = FP32 * h + FP32  # RMSNorm upcast: autograd keeps the fp32 input (pow/mul) and the fp32 rstd (mul/rsqrt)
    norms = arch.norms_per_layer - (1 if first else 0)  # layer 0's input norm sees embeddings that need no grad
    constant = norms * FP32 * h if arch.norm == "gemma" else 0  # gemma keeps the fp32 (1 + w) factor of each norm
    if s.use_dora:  # per output row: the fp32 weight norm the division keeps, and two bf16 factors of the DoRA term
        constant += sum(8 * t.out_features for t in layer_targets)
    repeat_kv = inv.kv_heads != a and (mode == "eager" or sdpa_masked(inv, s))  # transformers' repeat_kv copies K/V
    attn, per_square = _lora_saved(inv, attn_targets, s, mode), 0
    if mode == "flash":
        attn += BF16 * (2 * q + 2 * kv) + FP32 * a  # FlashAttention-2 backward inputs: Q, K, V, O + fp32 logsumexp
        if sdpa_masked(inv, s):
            attn += BF16 * (q - kv) * 2 if repeat_kv else 0  # K and V repeated to every head for the masked kernel
            per_square += BF16  # memory-efficient SDPA keeps its bf16 additive mask [b, 1, s, s]
    else:
        attn += BF16 * 3 * q  # eager: Q, K and V repeated to every head (matmul inputs)
        per_square += a * (FP32 + BF16)  # fp32 softmax output + its bf16 copy (Korthikanti's 5as/h term, bf16)
        per_square += a * BF16 if arch.attn_softcap else 0  # tanh output of gemma2's logit soft-capping
    if arch.fused_qkv and not repeat_kv:
        attn += BF16 * (q + kv)  # V is a view of the fused qkv output, so Q and K's part of it stays alive too
    if arch.rotary_cat and mode == "flash" and any(t.role == "attn_out" for t in attn_targets) and s.lora_dropout == 0:
        attn += BF16 * q  # o_proj's LoRA keeps the contiguous copy of the [b, a, s, d] attention output
    if arch.qk_norm:
        attn += FP32 * (q + kv) + FP32 * (a + inv.kv_heads)  # per-head RMSNorm on q and k (fp32 input + rstd)
    # SwiGLU/GeGLU (Shazeer 2020): the activation keeps its input, the product keeps activation output and up
    mlp = BF16 * (3 * i if arch.gated_mlp else i) + _lora_saved(inv, mlp_targets, s, mode)
    if s.tiled_mlp:  # the feed-forward norm and the MLP run inside the tiled block, which keeps only its bf16 input
        constant -= FP32 * h if arch.norm == "gemma" else 0
        tiled = BF16 * h
        return LayerActivations(
            (norms - 1) * norm + attn + tiled, per_square, constant, mlp_per_token=tiled, norm_per_token=norm
        )
    return LayerActivations(norms * norm + attn + mlp, per_square, constant, mlp_per_token=mlp, norm_per_token=norm)


def bnb8_held_bytes(inv: Inventory, layer_targets: list[LinearInfo], first: bool) -> int:
    """Bytes per token that bitsandbytes' 8-bit matmul keeps in `ctx.tensors` (outside checkpointing's hooks).

    MatMul8bitLt (CUDA) and MatMul8bitFp (CPU) store their input A on ctx for backward; layer 0's attention
    projections see embeddings that need no grad, so their ctx is dropped.
    """
    roles = {t.role for t in layer_targets if not (first and t.role == "attn_in")}
    return sum(_role_input_bytes(r, inv, next(t.in_features for t in layer_targets if t.role == r)) for r in roles)


@dataclass(frozen=True)
class ActivationModel:
    """Activation bytes for a micro-batch, per layer and in total."""

    full_layer: LayerActivations  # one (non-first) layer, everything autograd keeps
    stored_layers: int  # all decoder layers at the end of the forward (checkpoint inputs, or everything)
    checkpoint_per_layer_token: int  # bytes per token a checkpointed layer keeps (input + 8-bit held inputs)
    final_norm: int  # the final norm's fp32 input + rstd
    misc: int  # rotary cos/sin, labels, and what the checkpoint closures keep (position ids, masks)
    masks: int  # the attention masks, alive during every forward
    layer_stored: tuple[int, ...] = ()  # what each decoder layer keeps after the forward, in layer order
    checkpointed: tuple[bool, ...] = ()  # which decoder layers are checkpointed (train.checkpoint_every)


def checkpointed_layers(inv: Inventory, s: RunSettings) -> list[bool]:
    """Which decoder layers recompute in backward: all with checkpointing, or layers 0, k, 2k, ... with
    `checkpoint_every` k (`training.checkpointing.enable_gradient_checkpointing`)."""
    return [s.gradient_checkpointing and k % max(s.checkpoint_every, 1) == 0 for k in range(inv.layers)]


def activation_model(inv: Inventory, targets: list[LinearInfo], s: RunSettings) -> ActivationModel:
    """Stored activations of all decoder layers plus the small tensors around them."""
    by_layer: dict[int, list[LinearInfo]] = {k: [] for k in range(inv.layers)}
    for t in targets:
        if t.layer is not None:
            by_layer[t.layer].append(t)
    b, n, T = s.batch_size, s.seq_len, s.tokens
    stored, ckpt_token = 0, BF16 * inv.hidden
    checkpointed = checkpointed_layers(inv, s)
    layer_stored = []
    for k in range(inv.layers):
        layer = by_layer[k]
        before = stored
        if checkpointed[k]:
            # transformers' gradient_checkpointing_enable makes the embedding output require grad, so layer 0 is like the rest
            held = bnb8_held_bytes(inv, layer, first=False) if s.bits == 8 else 0
            layer_input = (
                0 if s.offload_activations else BF16 * inv.hidden
            )  # offloaded: save_on_cpu moves it to host memory
            stored += (layer_input + held) * T  # non-reentrant checkpoint keeps the layer input (+ what bnb holds)
            ckpt_token = max(ckpt_token, BF16 * inv.hidden + held)
        else:
            acts = layer_activations(inv, layer, s, first=k == 0)
            held = bnb8_held_bytes(inv, layer, k == 0) if s.bits == 8 and s.lora_dropout > 0 else 0
            stored += acts.at(b, n) + held * T  # with dropout the 8-bit layer's input is not shared with LoRA
        layer_stored.append(stored - before)
    reference = max(by_layer.values(), key=len) if targets else []
    full = layer_activations(inv, reference, s, first=False)
    final_norm = (FP32 * inv.hidden + FP32) * T  # the final RMSNorm's fp32 input and rstd
    final_norm += FP32 * inv.hidden if inv.arch.norm == "gemma" else 0  # and gemma's fp32 (1 + w)
    masks = attention_mask_bytes(inv, s)
    rotary = 2 * BF16 * n * inv.head_dim  # cos and sin [1, s, head_dim], computed once per forward
    labels = 8 * T  # shifted int64 labels kept by nll_loss
    kept_by_checkpoint = 8 * n + masks if any(checkpointed) else 0  # position ids [1, s] int64 and the masks
    misc = rotary + labels + kept_by_checkpoint
    return ActivationModel(full, stored, ckpt_token, final_norm, misc, masks, tuple(layer_stored), tuple(checkpointed))


def attention_mask_bytes(inv: Inventory, s: RunSettings) -> int:
    """The 4-D masks transformers builds for a forward (none when SDPA can use is_causal)."""
    b, n = s.batch_size, s.seq_len
    if attention_mode(inv, s) == "eager":
        kinds = 2 if inv.sliding_window is not None and inv.model_type == "gemma2" else 1
        return kinds * BF16 * b * n * n  # transformers' eager masks: [b, 1, s, s] in bf16, one per layer type
    if sdpa_masked(inv, s):
        return b * n * n  # bool sliding-window mask [b, 1, s, s]
    return 0


def loss_bytes(inv: Inventory, s: RunSettings) -> tuple[int, int, int]:
    """(peak bytes of the loss, bytes it keeps after the forward, cached-but-unusable bytes) for the micro-batch.

    transformers' ForCausalLMLoss and qlora_lite.train (fp32 cross-entropy on `.logits`) both upcast the bf16
    logits to fp32 and call cross_entropy = log_softmax + nll_loss; the peak is in log_softmax's backward:
    fp32 grad in + saved fp32 log-probs + fp32 grad out (3 x 4 bytes per logit), the bf16 logits being
    freed before backward (the caller keeps only the loss). The trainer drops the last position (s - 1
    logits per sequence); counting s is conservative by one token.
    """
    tokens = min(s.loss_chunk_tokens, s.tokens) if s.chunked_loss else s.tokens
    logits = tokens * inv.vocab
    softcap = BF16 * logits if inv.arch.final_softcap else 0  # gemma2: tanh output of the final soft-capping
    peak = 3 * FP32 * logits + softcap  # log_softmax backward: grad in, saved output, grad out (fp32)
    kept = FP32 * logits + softcap + 2 * FP32  # saved log-probs (+ tanh), nll's total_weight, the loss
    if s.chunked_loss:
        # qlora_lite.loss per chunk: one fp32 buffer (logits, then softmax, then their gradient, in place) beside the
        # bf16 matmul output or the bf16 gradient; soft-capping adds its fp32 tanh
        peak = (FP32 + BF16) * logits + (FP32 * logits if inv.arch.final_softcap else 0)
        peak += BF16 * inv.hidden * s.tokens  # gradient of the final hidden states, accumulated chunk by chunk
        kept = BF16 * inv.hidden * s.tokens + 2 * FP32  # that gradient waits for backward, with the loss
    cached = BF16 * logits  # the bf16 logits' block, freed before the fp32 ones are, too small to reuse (CUDA)
    return peak, kept, cached


# -------------------------------------------------------------------------------- temporaries


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
