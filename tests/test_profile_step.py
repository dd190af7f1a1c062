"""tools/profile_step.py's sorting of profiler operators into kinds of work (what docs/benchmarks.md's table reads)."""

from __future__ import annotations

from tests.helpers import load_tool


def test_operators_are_sorted_into_the_kinds_of_work():
    tool = load_tool("profile_step")
    kinds = {
        "aten::mm": "matrix products",
        "aten::bmm": "matrix products",
        "aten::addmm": "matrix products",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention kernels",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention kernels",
        "aten::_efficient_attention_backward": "attention kernels",
        "bitsandbytes::dequantize_4bit": "bitsandbytes (4-bit dequantize, 8-bit optimizer)",
        "bitsandbytes::quantize_blockwise": "bitsandbytes (4-bit dequantize, 8-bit optimizer)",
        "aten::mul": tool.OTHER,
        "aten::matmul": tool.OTHER,  # a wrapper: its self time is dispatch, its work is the aten::mm below it
        "MmBackward0": tool.OTHER,
    }
    assert {name: tool.kind_of(name) for name in kinds} == kinds
