"""Loading memory, measured from outside: the peak RSS of a fresh process that loads a 4-shard checkpoint
stays under the quantized model + the largest tensor in bf16 + a fixed overhead."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import load_tool

MIB = 2**20
# Allocator slack, bitsandbytes' per-tensor quantization temporaries and the dtype-conversion buffer.
FIXED_OVERHEAD = 96 * MIB


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_streaming_load_peak_rss_is_bounded(tmp_path):
    tool = load_tool("measure_load_memory")
    big, tiny = tool.make_models(tmp_path, hidden=1024, layers=12, vocab=8192, shard_size="100MB")
    assert len(list(big.glob("*.safetensors"))) >= 4
    checkpoint_bytes = sum(p.stat().st_size for p in big.glob("*.safetensors"))  # ~290 MiB of bf16

    baseline = tool.run_child("baseline", big, tiny)["peak"]
    ours = tool.run_child("qlora", big, tiny)
    above = ours["peak"] - baseline
    bound = ours["model_bytes"] + tool.largest_tensor_bf16(big) + FIXED_OVERHEAD
    assert above <= bound, f"peak {above / MIB:.0f} MiB above baseline > bound {bound / MIB:.0f} MiB"
    # a load that materialises the bf16 model before quantizing needs at least the checkpoint's size
    assert above < 0.7 * checkpoint_bytes
