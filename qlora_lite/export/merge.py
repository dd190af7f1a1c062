"""The merge math: each output tensor computed from its base weight and LoRA pair, a block of rows at a time.

A targeted weight becomes `deq(quantize(W)) + scaling·B·A` (the weights the adapter trained against) or
`W + scaling·B·A`, in fp32, cast to the output dtype and checked to fit it; other tensors are cast and copied.
A DoRA adapter then scales each row V = W + scaling·B·A to its magnitude: `m / ||V||_row · V` (peft's DoRA merge;
each block holds whole rows, so the row norms are exact). Working memory stays at about one tensor's worth.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config.settings import QuantConfig
from ..errors import ExportError
from ..model import quant
from .plan import ExportPlan, _Item

# Rows of a merged weight computed at once in fp32: bounds the fp32 working set to ~8 MB per chunk.
CHUNK_ELEMENTS = 2 * 2**20
# Elements quantized per call: bitsandbytes' CPU quantizer needs ~20 bytes of temporaries per element.
QUANT_CHUNK_ELEMENTS = 2**18


def quantize_4bit_chunked(
    weight: torch.Tensor, settings: QuantConfig, chunk_elements: int = QUANT_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, quant.bnbf.QuantState]:
    """`quant.quantize_4bit` computed a block-aligned chunk at a time: the same packed bytes and QuantState.

    bitsandbytes' CPU quantizer allocates about 20 bytes per element in fp32/int32 temporaries; blocks are
    independent, so chunking its op bounds that to the chunk. The double quantization of the absmax vector
    (n / blocksize floats) runs on the whole vector, exactly as `bnbf.quantize_4bit` does it.
    """
    bnbf, blocksize = quant.bnbf, settings.blocksize
    w = weight.to(quant.COMPUTE_DTYPE).contiguous().reshape(-1)
    step = max(blocksize, chunk_elements // blocksize * blocksize)
    packed_parts, absmax_parts = [], []
    for start in range(0, w.numel(), step):
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(
            w[start : start + step], blocksize, settings.quant_type, torch.uint8
        )
        packed_parts.append(packed)
        absmax_parts.append(absmax)
    packed, absmax = torch.cat(packed_parts), torch.cat(absmax_parts)
    del packed_parts, absmax_parts
    code = bnbf.get_4bit_type(settings.quant_type, device=w.device)
    common = dict(
        shape=weight.shape, dtype=quant.COMPUTE_DTYPE, blocksize=blocksize, code=code, quant_type=settings.quant_type
    )
    if not settings.double_quant:
        return packed, bnbf.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=quant.NESTED_BLOCKSIZE)
    return packed, bnbf.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def _int8_rows(weight: torch.Tensor) -> Callable[[slice], torch.Tensor]:
    """Rows of deq(quantize_8bit(weight)) in fp32, quantized a block of rows at a time when asked for."""

    # LLM.int8 scales each row on its own, so quantizing a block of rows at a time is exact
    def rows_8bit(rows: slice) -> torch.Tensor:
        codes, scales = quant.quantize_8bit(weight[rows])
        return (codes.float() * (scales.float().unsqueeze(1) / 127.0)).cpu()

    return rows_8bit


def _dequantized_rows(
    weight: torch.Tensor, settings: QuantConfig, device: torch.device
) -> Callable[[slice], torch.Tensor]:
    """Rows of deq(quantize(weight)) in fp32, bit-identical to what the loaded quantized layer multiplies by."""
    weight = weight.to(device)
    if settings.bits == 8:
        return _int8_rows(weight)
    packed, state = quantize_4bit_chunked(weight, settings)
    del weight
    # bf16, like Linear4bit's forward: dequantize_4bit(...) then the compute dtype
    deq = quant.bnbf.dequantize_4bit(packed, state)
    del packed
    return lambda rows: deq[rows].float().cpu()


def _extremes(values: torch.Tensor) -> tuple[float, float]:
    # aminmax reduces without a tensor-sized temporary (isinf / abs would allocate one); NaN propagates
    if not values.numel():
        return 0.0, 0.0
    lo, hi = torch.aminmax(values)
    return lo.item(), hi.item()


def _check_range(values: torch.Tensor, key: str, dtype: torch.dtype) -> None:
    lo, hi = _extremes(values)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ExportError(
            f"merged tensor {key!r} has NaN or infinite values; the adapter (or base weight) is broken, re-train or re-save it."
        )
    peak = max(-lo, hi)
    if dtype == torch.float16 and peak > torch.finfo(torch.float16).max:
        raise ExportError(
            f"merged tensor {key!r} reaches {peak:.4g}, beyond float16's range (65504); export with dtype bfloat16 (--dtype bfloat16)."
        )


def _merged_tensor(item: _Item, plan: ExportPlan, device: torch.device) -> torch.Tensor:
    """deq(W_q) (or W) + scaling·B·A in fp32 (DoRA: each row scaled by m / its norm), cast to the output dtype, in
    the checkpoint's own layout."""
    if plan.merge_into == "dequantized" and item.dequantize:
        weight = item.shard.read(item.key, quant.COMPUTE_DTYPE)
        rows_of = _dequantized_rows(weight.t() if item.conv1d else weight, plan.quant, device)
    else:
        weight = item.shard.read(item.key)
        view = weight.t() if item.conv1d else weight
        rows_of = lambda rows: view[rows].float()  # noqa: E731
    del weight
    out = torch.empty(item.shape, dtype=plan.dtype)
    dest = out.t() if item.conv1d else out  # [out, in] view onto the stored layout
    out_f, in_f = dest.shape
    lora = item.lora
    a = plan.adapter.read(lora.key_a, torch.float32) if lora else None
    b = plan.adapter.read(lora.key_b, torch.float32) if lora else None
    magnitude = plan.adapter.read(lora.key_m, torch.float32) if lora and lora.key_m else None
    step = max(1, CHUNK_ELEMENTS // max(in_f, 1))
    for start in range(0, out_f, step):
        rows = slice(start, min(start + step, out_f))
        merged = rows_of(rows)
        if lora is not None:
            merged.addmm_(b[rows], a, alpha=lora.scaling)
        if magnitude is not None:  # DoRA: V = W + scaling·B·A rescaled row by row to m / ||V||
            merged.mul_((magnitude[rows] / torch.linalg.vector_norm(merged, dim=1)).unsqueeze(1))
        _check_range(merged, item.key, plan.dtype)
        dest[rows].copy_(merged)
    return out


def _mean_row(item: _Item) -> torch.Tensor:
    """The new rows' value: the fp32 mean of the base's rows as the loader holds them (bf16), cast back to bf16,
    as `model.embeddings.resize_embeddings` computes it; a block of columns at a time to bound the fp32 copy."""
    weight = item.shard.read(item.key, quant.COMPUTE_DTYPE)
    rows = weight.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(rows, 1))
    flat = weight.reshape(rows, -1)
    parts = [flat[:, i : i + step].float().mean(dim=0).to(weight.dtype) for i in range(0, flat.shape[1], step)]
    return torch.cat(parts).reshape(weight.shape[1:])


def _grown_tensor(item: _Item, plan: ExportPlan) -> torch.Tensor:
    """A resized embedding, head or head bias: the base's rows, the mean row for each added row, then the
    adapter's trained rows written over their indices; refuses values beyond the output dtype."""
    base = _copied_tensor(item)  # the checkpoint's rows, as stored
    out = torch.empty(item.shape, dtype=item.dtype)
    out[: base.shape[0]] = base
    del base
    out[item.shard.shape(item.key)[0] :] = _mean_row(item).to(item.dtype)
    if item.token_key is not None:
        rows = plan.adapter.read(item.token_key, torch.float32)
        _check_range(rows, item.token_key, item.dtype)
        out[torch.tensor(item.token_rows, dtype=torch.long)] = rows.to(item.dtype)
    return out


def _saved_tensor(item: _Item, plan: ExportPlan) -> torch.Tensor:
    """A modules_to_save tensor: the adapter's trained values whole, cast to the output dtype (range checked)."""
    values = plan.adapter.read(item.saved_key, torch.float32)
    _check_range(values, item.saved_key, item.dtype)
    return values.to(item.dtype)


def _count_inf(tensor: torch.Tensor) -> int:
    flat = tensor.reshape(-1)
    return sum(int(torch.isinf(flat[i : i + CHUNK_ELEMENTS]).sum()) for i in range(0, flat.numel(), CHUNK_ELEMENTS))


def _copied_tensor(item: _Item) -> torch.Tensor:
    """An untargeted tensor cast to the output dtype; refuses values the cast turns into infinity."""
    tensor = item.shard.read(item.key, item.dtype)
    if item.dtype == torch.float16 and math.inf in (abs(v) for v in _extremes(tensor)):
        if _count_inf(tensor) != _count_inf(item.shard.read(item.key)):  # not infinities the checkpoint already had
            raise ExportError(
                f"tensor {item.key!r} holds values beyond float16's range (65504); export with dtype bfloat16 (--dtype bfloat16)."
            )
    return tensor


__all__ = ["quantize_4bit_chunked", "CHUNK_ELEMENTS", "QUANT_CHUNK_ELEMENTS"]


def produce_tensor(item: _Item, plan: ExportPlan, device: torch.device) -> torch.Tensor:
    """The merged export's tensor for `item`: a modules_to_save or token-row tensor from the adapter, a grown
    embedding, a merged (or dequantized) weight, or a copy of the base's tensor."""
    if item.saved_key is not None:
        return _saved_tensor(item, plan)
    if item.grow_to:
        return _grown_tensor(item, plan)
    if item.lora is not None or item.dequantize:
        return _merged_tensor(item, plan, device)
    return _copied_tensor(item)
