"""DoRA (weight-decomposed LoRA) over a frozen (quantized) linear layer, as peft computes it.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"; peft's `DoraLinearLayer` / `DoraLinearVariant`:
a trained magnitude m [out] scales each output row of the adapted weight W + scaling·B·A to that row's norm,

    W' = m / ||W + scaling·B·A||_row · (W + scaling·B·A)

with the norm detached from the graph (section 4.3 of the paper: "weight_norm.detach()"), so no gradient flows
through it. The forward adds to the base output what peft's `DoraLinearLayer.forward` adds:

    result + (m/n - 1) · base_result + (m/n) · scaling · B(A(x))

where base_result is the base output without its bias, or, when the adapter's dropout is active (training with
dropout > 0), the base layer applied again to the dropped-out input (peft's `F.linear(dropout(x), W)`; the base
layer multiplies by the same dequantized weight and keeps only its packed weight for backward).

Precision: W is dequantized exactly as the base layer's forward multiplies by it (`quant.dequantize_module`),
W + scaling·B·A and its row norms are computed in fp32 (autocast off) a block of rows at a time, and the norm is
held in the magnitude's dtype, as peft holds it in the compute dtype. The magnitude starts as that same norm, so
m/n is exactly 1 and a fresh adapter (B = 0) leaves the output unchanged. The magnitude is a parameter in the
adapter dtype beside A and B (the optimizer keeps its fp32 master), saved as peft names it:
`<module path>.lora_magnitude_vector`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .lora import LoraLinear
from .quant import COMPUTE_DTYPE, bnb, bnbf, row_scales_8bit

MAGNITUDE = "lora_magnitude_vector"
# Elements of W + scaling·B·A held in fp32 at once while the row norms are computed (4 MiB).
NORM_CHUNK_ELEMENTS = 2**20


def _weight_rows(base: nn.Module) -> Callable[[slice], torch.Tensor]:
    """fp32 rows [rows, in] of the weight the base layer multiplies by, each call a fresh tensor."""
    if isinstance(base, bnb.nn.Linear4bit):
        deq = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)  # bf16, as its forward
        return lambda rows: deq[rows].float()
    if isinstance(base, bnb.nn.Linear8bitLt):
        return lambda rows: dequantize_rows_8bit(base, rows)
    weight = base.weight.detach()
    if hasattr(base, "nf") and not isinstance(base, nn.Linear):  # transformers' Conv1D keeps [in, out]
        weight = weight.t()
    return lambda rows: weight[rows].to(torch.float32, copy=True)


def dequantize_rows_8bit(base: nn.Module, rows: slice) -> torch.Tensor:
    """Rows of `quant.dequantize_module(base)` for an LLM.int8 layer (each row has its own scale, so exact)."""
    return base.weight.data[rows].float() * (row_scales_8bit(base)[rows].float().unsqueeze(1) / 127.0)


@torch.no_grad()
def dora_weight_norm(
    base: nn.Module,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    chunk_elements: int = NORM_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """||W + scaling·B·A|| of each output row in fp32 [out], W the base's dequantized weight; no graph.

    Working memory: the base's bf16 dequantized weight (4-bit; what its own forward also creates) and one fp32 block
    of rows; the [out, in] product B·A is never formed whole (added into each block in place).
    """
    rows_of = _weight_rows(base)
    out_f, in_f = lora_b.shape[0], lora_a.shape[1]
    a, b = lora_a.detach().float(), lora_b.detach().float()
    norm = torch.empty(out_f, dtype=torch.float32, device=a.device)
    step = max(1, chunk_elements // max(in_f, 1))
    with torch.autocast(a.device.type, enabled=False):
        for start in range(0, out_f, step):
            rows = slice(start, min(start + step, out_f))
            block = rows_of(rows).to(a.device)
            block.addmm_(b[rows], a, alpha=scaling)
            norm[rows] = torch.linalg.vector_norm(block, dim=1)
    return norm


class DoraLinear(LoraLinear):
    """LoRA's A and B plus a trainable magnitude per output row (`lora_magnitude_vector`, [out]), peft's DoRA.

    Raises `ConfigError` when the base's weights are not loaded (the meta device): the magnitude starts from them.
    """

    adapter_names = (*LoraLinear.adapter_names, MAGNITUDE)

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        adapter_dtype: torch.dtype = COMPUTE_DTYPE,
    ):
        super().__init__(base_layer, r, alpha, dropout, rslora, adapter_dtype)
        if any(t.device.type == "meta" for t in base_layer.parameters()):
            raise ConfigError(
                "lora.use_dora needs the base weights loaded (its magnitude starts from their row norms), but this "
                "layer's weights are on the meta device (train.fsdp loads them later); turn one of the two off."
            )
        magnitude = self.weight_norm().to(adapter_dtype)  # m/n is exactly 1 at the start: B = 0
        self.lora_magnitude_vector = nn.Parameter(magnitude)

    def weight_norm(self) -> torch.Tensor:
        """The detached fp32 row norms ||W + scaling·B·A|| [out] (recomputed every forward, as in peft)."""
        return dora_weight_norm(self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result
        else:  # peft: the base term is recomputed on the dropped-out input
            x = self.lora_dropout(x)
            base_result = self.base_layer(x)
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            base_result = base_result - bias
        magnitude = self.lora_magnitude_vector
        weight_norm = self.weight_norm().to(magnitude.dtype)  # detached: no gradient through the norm
        scale = magnitude.float() / weight_norm.float()  # m / ||W + scaling·B·A||, grad to m only
        lora_result = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))
        # peft adds the DoRA term in the adapter's compute dtype and casts the sum back: bf16 adapters compute in bf16,
        # fp32 ones (peft's default) in fp32. (m/n - 1) is taken in fp32 before any cast: m/n is close to 1.
        dtype = torch.promote_types(result.dtype, lora_result.dtype)
        result_dora = (scale - 1).to(dtype) * base_result.to(dtype) + (scale * self.scaling).to(dtype) * lora_result
        return (result + result_dora).to(result.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


__all__ = ["DoraLinear", "MAGNITUDE", "dora_weight_norm"]
