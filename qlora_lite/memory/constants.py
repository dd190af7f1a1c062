"""Sizes the memory model counts in: byte units and bytes per element of the dtypes a QLoRA step holds."""

from __future__ import annotations

MiB = 1 << 20
GiB = 1 << 30

BF16 = 2  # bytes per bf16 element (weights that stay unquantized, adapters, their gradients, activations)
FP32 = 4  # bytes per fp32 element
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes' Optimizer2State min_8bit_size: smaller tensors keep fp32 optimizer state
