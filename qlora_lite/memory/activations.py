"""What autograd keeps during a micro-batch: each decoder layer's saved tensors, the activation model of the whole
stack, attention masks and the loss's logits. What runs beside them (dequantized weights, forward temporaries, one
layer's backward): `memory.working_sets`.

The saved tensors follow the autograd rules of the code that runs (transformers' decoder layers, our LoRA
layer, bitsandbytes' matmul functions), in the style of Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (per-layer bytes per token), adapted to RMSNorm, SwiGLU/GeGLU,
grouped-query attention with a fused (flash) kernel, bf16 and LoRA; tests check the stored activations
byte for byte on the CPU with `memory.probe.AllocationTracker`. How these add up to a peak: `memory.report`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
