"""Exact bytes of what stays on the GPU for the whole run: quantized and bf16 weights, LoRA adapters and the
optimizer's state, following bitsandbytes' storage layout (tests check them byte for byte against real tensors)."""

from __future__ import annotations

import math

from ..model.quant import weight_bytes_4bit, weight_bytes_8bit
from .constants import BF16, BNB_8BIT_MIN_SIZE, FP32
from .inventory import Inventory, LinearInfo
from .settings import RunSettings

BNB_STATE_BLOCK = 256  # bitsandbytes 8-bit optimizers quantize state1/state2 blockwise, 256 values per fp32 absmax
BNB_PAGED_MIN_NUMEL = 100_000  # bitsandbytes Optimizer8bit.get_state_buffer pages only tensors with numel >= 1e5


def quantized_weight_bytes(targets: list[LinearInfo], s: RunSettings) -> int:
    """Stored bytes of the targeted weights: packed 4-bit codes + absmax (+ nested stats) or int8 + row scales."""
    if s.bits == 4:  # quant.weight_bytes_4bit: bitsandbytes' QuantState layout, tested equal to real tensors
        return sum(weight_bytes_4bit(t.out_features, t.in_features, s.double_quant, s.blocksize) for t in targets)
    return sum(weight_bytes_8bit(t.out_features, t.in_features) for t in targets)  # LLM.int8: codes + fp32 scales


def unquantized_weight_bytes(inv: Inventory, targets: list[LinearInfo]) -> int:
    """bf16 bytes of every parameter that is not a targeted weight (embeddings, lm_head, norms, all biases)."""
    quantized = {f"{t.path}.weight" for t in targets}
    return BF16 * sum(n for name, n in inv.param_numel.items() if name not in quantized)  # loader keeps the rest bf16


def adapter_numels(targets: list[LinearInfo], rank: int, dora: bool = False) -> list[int]:
    """Element counts of every adapter tensor: A [r, in] and B [out, r] per targeted layer, and with DoRA its
    magnitude vector [out] (`model.dora.DoraLinear.lora_magnitude_vector`, in the adapter dtype like A and B, so its
    gradient, fp32 master and optimizer state are counted with theirs)."""
    out = []
    for t in targets:
        out += [rank * t.in_features, t.out_features * rank] + ([t.out_features] if dora else [])
    return out


def token_numels(inv: Inventory, rows: int) -> list[int]:
    """Element counts of the new-token deltas ([rows, dim] bf16): the embedding's, and the head's when untied
    (a tied head shares the embedding's delta, as in `model.embeddings.apply_trainable_tokens`)."""
    if rows <= 0:
        return []
    embed, head = inv.skeleton.get_input_embeddings(), inv.skeleton.get_output_embeddings()
    out = [rows * embed.weight.shape[1]]
    if head is not None and head.weight is not embed.weight:
        out.append(rows * head.weight.shape[1])
    return out


def module_numels(inv: Inventory, names: tuple[str, ...]) -> list[int]:
    """Element counts of the parameters of modules trained whole (`lora.modules_to_save`), matched as the trainer
    matches them (`model.lora.matches_module_entry`: the path is the entry or ends with `.entry`)."""
    if not names:
        return []
    return [
        n for name, n in inv.param_numel.items()
        if any(name.rsplit(".", 1)[0] == e or name.rsplit(".", 1)[0].endswith(f".{e}") for e in names)
    ]  # fmt: skip


def added_numels(inv: Inventory, targets: list[LinearInfo], s: RunSettings) -> list[int]:
    """Element counts of the tensors training adds to the model: LoRA A/B (DoRA's magnitudes), then the new-token
    deltas."""
    return adapter_numels(targets, s.rank, s.use_dora) + token_numels(inv, s.trainable_token_rows)


def adapter_bytes_each(s: RunSettings) -> int:
    """Bytes per element of LoRA A and B (and DoRA's magnitudes), and of their gradients: `lora.adapter_dtype`."""
    return FP32 if s.adapter_dtype == "float32" else BF16


def added_bytes(inv: Inventory, targets: list[LinearInfo], s: RunSettings) -> int:
    """Bytes of the tensors training adds: the adapters in their dtype, the new-token deltas in bf16."""
    adapters = sum(adapter_numels(targets, s.rank, s.use_dora))
    return adapter_bytes_each(s) * adapters + BF16 * sum(token_numels(inv, s.trainable_token_rows))


def adapter_casts(targets: list[LinearInfo], s: RunSettings) -> int:
    """Bytes of the bf16 copies bf16 autocast makes of fp32 adapters for the forward (cached for the whole forward,
    kept by autograd for backward); none for bf16 adapters."""
    return BF16 * sum(adapter_numels(targets, s.rank, s.use_dora)) if s.adapter_dtype == "float32" else 0


def trainable_numels(inv: Inventory, targets: list[LinearInfo], s: RunSettings) -> list[int]:
    """Every trained tensor's element count: the added tensors, then the modules trained whole in place (their
    weights are the base's own, counted once as unquantized weights; their gradients and state are counted here)."""
    return added_numels(inv, targets, s) + module_numels(inv, s.modules_to_save)


def optimizer_state_bytes(numels: list[int], optimizer: str, per_tensor: bool = False) -> tuple[int, int]:
    """(bytes, of which paged) of `AdapterOptimizer`: fp32 masters + the inner optimizers' state tensors.

    By default its flat layout: one fp32 master buffer of sum(numels) elements; torch AdamW's state for that one
    tensor, or bitsandbytes' 8-bit state for the part of the tensors of min_8bit_size or more and fp32 state for the
    part of the smaller ones. `per_tensor`: one master and one inner state per tensor, as for FSDP's shards
    (`memory.ranks`).
    """
    masters = FP32 * sum(numels)  # fp32 master copy of each adapter tensor (flat: one buffer of them all)
    if per_tensor or not numels:
        tensors = [(n, n >= BNB_8BIT_MIN_SIZE) for n in numels]
    elif optimizer == "adamw":
        tensors = [(sum(numels), False)]
    else:
        big, small = sum(n for n in numels if n >= BNB_8BIT_MIN_SIZE), sum(n for n in numels if n < BNB_8BIT_MIN_SIZE)
        tensors = [(n, eight) for n, eight in ((big, True), (small, False)) if n]
    if optimizer == "adamw":  # torch AdamW: exp_avg, exp_avg_sq fp32 + an fp32 step per tensor
        return masters + sum(2 * FP32 * n + FP32 for n, _ in tensors), 0
    total, paged, any_8bit = masters, 0, False
    for n, eight in tensors:
        if not eight:
            state = 2 * FP32 * n  # bitsandbytes keeps fp32 state1/state2 below min_8bit_size
        else:
            any_8bit = True
            state = 2 * n  # uint8 state1 + state2
            total += 2 * FP32 * math.ceil(n / BNB_STATE_BLOCK)  # fp32 absmax1/absmax2, one per 256-value block
            if optimizer == "paged_adamw_8bit" and n >= BNB_PAGED_MIN_NUMEL:
                paged += state  # state1/state2 in CUDA unified memory (cudaMallocManaged), outside torch's allocator
        total += state
    if any_8bit:
        total += 2 * 256 * FP32  # the shared 256-entry fp32 qmaps "dynamic" and "udynamic"
    return total, paged
