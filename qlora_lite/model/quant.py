"""Quantize and dequantize one weight with bitsandbytes, and count the bytes each form takes.

The quantized layers are bitsandbytes' own `Linear4bit` / `Linear8bitLt`, the modules that transformers
and peft use, so packed bytes and forward numerics match that stack exactly.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from ..errors import ConfigError

# On AVX512-BF16 CPUs bitsandbytes logs at import that an optional hub-downloaded kernel is missing; it falls
# back to its own kernel, and the notice would otherwise precede every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

# bitsandbytes' double quantization re-quantizes absmax in blocks of 256 (QuantState.state2).
NESTED_BLOCKSIZE = 256
COMPUTE_DTYPE = torch.bfloat16


def check_bits(bits: int) -> None:
    """Refuse anything but 4 or 8 bits with a message that says what is supported."""
    if bits not in (4, 8):
        raise ConfigError(f"bits is {bits}, but only 4 (NF4/FP4) and 8 (LLM.int8) are supported; use 4 or 8.")


def quantize_4bit(
    weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64
) -> tuple[torch.Tensor, bnbf.QuantState]:
    """Pack a [out, in] weight to 4 bits on its device; returns (packed uint8 [n/2, 1], QuantState).

    The weight is quantized from bf16, as transformers does when loading with a bf16 compute dtype.
    """
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant_type is {quant_type!r}; use 'nf4' or 'fp4'.")
    w = weight.to(COMPUTE_DTYPE).contiguous()
    return bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.uint8
    )


def quantize_8bit(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 row-wise quantization of a [out, in] weight: (int8 [out, in], fp32 row scales [out]).

    Like bitsandbytes' `Int8Params`, the weight goes through fp16 first.
    """
    codes, row_scales, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return codes, row_scales


def _linear4bit(
    out_features: int,
    in_features: int,
    data: torch.Tensor,
    state: bnbf.QuantState | None,
    bias: torch.Tensor | None,
    quant_type: str,
    double_quant: bool,
    blocksize: int,
) -> bnb.nn.Linear4bit:
    """A frozen `Linear4bit` whose weight is `data` (packed uint8) with the quantization `state` (None: set later)."""
    module = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=COMPUTE_DTYPE,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
        device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        data=data,
        requires_grad=False,
        quant_state=state,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
        module=module,
        bnb_quantized=True,
    )
    # bitsandbytes restores the weight's state from the module's when something (FSDP's sharding) has replaced
    # the Params4bit by a plain parameter; a Params4bit that quantizes itself sets it, ours arrives packed.
    module.quant_state = state
    if bias is not None:
        module.bias = nn.Parameter(bias.to(COMPUTE_DTYPE), requires_grad=False)
    # On CPUs with AVX512-BF16, bitsandbytes re-packs the weight in place at the first eval-mode forward.
    # That changes the stored bytes and breaks dequantization for export, so keep the standard layout.
    module.support_avx512bf16_for_cpu = False
    return module


def make_linear4bit(
    packed: torch.Tensor,
    state: bnbf.QuantState,
    bias: torch.Tensor | None,
    quant_type: str,
    double_quant: bool,
    blocksize: int = 64,
) -> bnb.nn.Linear4bit:
    """A frozen bitsandbytes `Linear4bit` around an already packed weight (no re-quantization)."""
    out_features, in_features = state.shape
    return _linear4bit(out_features, in_features, packed, state, bias, quant_type, double_quant, blocksize)


def packed_shape_4bit(out_features: int, in_features: int) -> tuple[int, int]:
    """The shape of bitsandbytes' packed uint8 storage of a [out, in] weight: two 4-bit codes per byte, one column."""
    return (out_features * in_features + 1) // 2, 1


def empty_linear4bit(
    out_features: int,
    in_features: int,
    bias: bool,
    quant_type: str,
    double_quant: bool,
    blocksize: int = 64,
) -> bnb.nn.Linear4bit:
    """A frozen `Linear4bit` whose packed weight (and bias) are on the meta device and which has no quantization
    state yet: the shape of `make_linear4bit`'s layer, for a loader that fills the weight (or a shard of it) later
    and then sets `module.quant_state` (and `module.weight.quant_state` while the weight is still a Params4bit)."""
    data = torch.empty(packed_shape_4bit(out_features, in_features), dtype=torch.uint8, device="meta")
    meta_bias = torch.empty(out_features, dtype=COMPUTE_DTYPE, device="meta") if bias else None
    return _linear4bit(out_features, in_features, data, None, meta_bias, quant_type, double_quant, blocksize)


def make_linear8bit(
    codes: torch.Tensor, row_scales: torch.Tensor, bias: torch.Tensor | None, threshold: float = 6.0
) -> bnb.nn.Linear8bitLt:
    """A frozen bitsandbytes `Linear8bitLt` (LLM.int8) around already quantized codes and row scales."""
    out_features, in_features = codes.shape
    module = bnb.nn.Linear8bitLt(
        in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=threshold, device="meta"
    )
    module.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=row_scales)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(COMPUTE_DTYPE), requires_grad=False)
    return module


def is_quantized_linear(module: nn.Module) -> bool:
    """True for the bitsandbytes layers this package builds."""
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def row_scales_8bit(module: bnb.nn.Linear8bitLt) -> torch.Tensor:
    """The fp32 row scales of an 8-bit layer, wherever bitsandbytes keeps them at the moment."""
    scales = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
    if scales is None:
        raise RuntimeError("8-bit layer has no row scales; it was not quantized")
    return scales


def dequantize_module(module: nn.Module) -> torch.Tensor:
    """The float32 [out, in] weight a quantized layer represents (exactly what its forward multiplies by)."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.data.float() * (row_scales_8bit(module).float().unsqueeze(1) / 127.0)
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    raise TypeError(f"cannot dequantize {type(module).__name__}")


def quant_state_tensors(state: bnbf.QuantState) -> list[torch.Tensor]:
    """Every tensor a 4-bit QuantState holds (absmax, code table, nested statistics)."""
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes the stored weight of a (quantized) linear takes, statistics included, bias excluded."""
    if isinstance(module, bnb.nn.Linear4bit):
        tensors = [module.weight.data] + quant_state_tensors(module.weight.quant_state)
    elif isinstance(module, bnb.nn.Linear8bitLt):
        tensors = [module.weight.data, row_scales_8bit(module)]
    else:
        tensors = [module.weight]
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes_4bit(out_features: int, in_features: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes bitsandbytes stores for one 4-bit weight: packed codes + absmax (+ nested stats) + code tables."""
    n = out_features * in_features
    blocks = math.ceil(n / blocksize)
    packed = math.ceil(n / 2)  # two 4-bit codes per byte
    code_table = 16 * 4  # the 16-entry fp32 NF4/FP4 lookup table
    if not double_quant:
        return packed + blocks * 4 + code_table  # one fp32 absmax per block
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    # uint8 absmax per block, fp32 absmax per 256 blocks, 256-entry fp32 dynamic code, fp32 offset
    return packed + blocks + nested_blocks * 4 + 256 * 4 + 4 + code_table


def weight_bytes_8bit(out_features: int, in_features: int) -> int:
    """Bytes LLM.int8 stores for one weight: int8 codes + one fp32 scale per output row."""
    return out_features * in_features + out_features * 4
