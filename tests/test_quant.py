"""One weight to 4-bit / 8-bit and back, against an independent reference, and the bytes each form takes."""

from __future__ import annotations

import pytest
import torch

from qlora_lite.model import quant

# The NF4 code book of the QLoRA paper (Dettmers et al. 2023, appendix E), as bitsandbytes ships it.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip


def reference_nf4_roundtrip(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Blockwise absmax scaling, nearest NF4 code, scale back: the paper's definition, in fp32."""
    flat = weight.to(torch.bfloat16).float().reshape(-1, blocksize)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    idx = ((flat / absmax).unsqueeze(-1) - NF4).abs().argmin(dim=-1)
    return (NF4[idx] * absmax).reshape(weight.shape)


def test_nf4_matches_paper_definition():
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    packed, state = quant.quantize_4bit(weight, "nf4", double_quant=False)
    ours = quant.bnbf.dequantize_4bit(packed, state).float()
    ref = reference_nf4_roundtrip(weight)
    # bitsandbytes decides by midpoints in its own float arithmetic; a tie can land on the neighbour code
    mismatch = (ours - ref).abs() > 1e-2 * ref.abs().clamp_min(1e-3)
    assert mismatch.float().mean() < 1e-3
    assert state.blocksize == 64 and state.quant_type == "nf4"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_only_perturbs_absmax_slightly(quant_type):
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    plain_packed, plain = quant.quantize_4bit(weight, quant_type, double_quant=False)
    dq_packed, dq = quant.quantize_4bit(weight, quant_type, double_quant=True)
    assert torch.equal(plain_packed, dq_packed)  # codes are the same; only the statistics are re-quantized
    assert dq.absmax.dtype == torch.uint8 and plain.absmax.dtype == torch.float32
    a = quant.bnbf.dequantize_4bit(plain_packed, plain)
    b = quant.bnbf.dequantize_4bit(dq_packed, dq)
    assert ((a - b).norm() / a.norm()).item() < 1e-2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_roundtrip_error_is_what_4_bits_give(quant_type):
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    packed, state = quant.quantize_4bit(weight, quant_type)
    error = ((quant.bnbf.dequantize_4bit(packed, state).float() - weight).norm() / weight.norm()).item()
    # Gaussian weights, blocksize 64: NF4 gives 0.091 relative RMS error here, FP4 0.122 (NF4 is the better code)
    low, high = (0.08, 0.10) if quant_type == "nf4" else (0.11, 0.13)
    assert low < error < high


def test_8bit_is_rowwise_absmax_rounding():
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    codes, scales = quant.quantize_8bit(weight)
    w16 = weight.half().float()
    assert torch.equal(scales, w16.abs().amax(dim=1))
    expected = torch.round(w16 * 127 / scales.unsqueeze(1)).to(torch.int8)
    assert (codes != expected).sum() <= 2  # rounding of exact halves may differ by one code
    layer = quant.make_linear8bit(codes, scales, None)
    assert torch.allclose(quant.dequantize_module(layer), w16, atol=scales.max().item() / 127)


@pytest.mark.parametrize("shape", [(64, 64), (96, 200), (3, 5), (1000, 77)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_byte_count_equals_real_tensors(shape, double_quant):
    packed, state = quant.quantize_4bit(torch.randn(*shape), "nf4", double_quant)
    layer = quant.make_linear4bit(packed, state, None, "nf4", double_quant)
    assert quant.module_weight_bytes(layer) == quant.weight_bytes_4bit(*shape, double_quant=double_quant)


@pytest.mark.parametrize("shape", [(64, 64), (96, 200), (3, 5)])
def test_8bit_byte_count_equals_real_tensors(shape):
    codes, scales = quant.quantize_8bit(torch.randn(*shape))
    layer = quant.make_linear8bit(codes, scales, None)
    assert quant.module_weight_bytes(layer) == quant.weight_bytes_8bit(*shape)


def test_bits_other_than_4_or_8_are_refused():
    from qlora_lite.errors import ConfigError

    with pytest.raises(ConfigError, match="only 4 .* and 8 .* are supported"):
        quant.check_bits(3)
