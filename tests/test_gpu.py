"""CUDA against CPU: the same 4-bit packed weights, and the same LoRA forward (skipped without a CUDA GPU)."""

from __future__ import annotations

import pytest
import torch

from qlora_lite import apply_lora, load_quantized
from qlora_lite.model.lora import lora_layers
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu


def test_cuda_load_packs_the_same_4bit_bytes_and_gives_the_same_lora_forward_as_cpu(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    cpu, _ = load_quantized(model_dir, bits=4, quant_type="nf4", double_quant=True, device="cpu", load_tokenizer=False)
    gpu, _ = load_quantized(model_dir, bits=4, quant_type="nf4", double_quant=True, device="cuda", load_tokenizer=False)
    assert cpu.qlora_targets and gpu.qlora_targets == cpu.qlora_targets

    # packed 4-bit codes, before any forward (bitsandbytes may repack CPU weights for its kernel at the first one)
    differing, total = {}, 0
    for name in cpu.qlora_targets:
        mine, theirs = cpu.get_submodule(name).weight, gpu.get_submodule(name).weight
        assert theirs.device.type == "cuda", name
        a, b = mine.data.cpu(), theirs.data.cpu()
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8, (name, a.shape, b.shape, a.dtype, b.dtype)
        total += a.numel()
        if (n := int((a != b).sum())) > 0:
            differing[name] = n
    assert not differing, f"{sum(differing.values())} of {total} packed bytes differ between CUDA and CPU: {differing}"

    # the same (non-zero) adapters on both sides, then one forward each
    apply_lora(cpu, r=8, alpha=16, seed=0)
    apply_lora(gpu, r=8, alpha=16, seed=0)
    g = torch.Generator().manual_seed(0)
    gpu_layers = lora_layers(gpu)
    with torch.no_grad():
        for name, layer in lora_layers(cpu).items():
            for ab in ("lora_A", "lora_B"):
                weight = getattr(layer, ab).weight
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.2)
                getattr(gpu_layers[name], ab).weight.copy_(weight)
    cpu.eval()
    gpu.eval()
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = cpu(input_ids=ids).logits.float()
        logits = gpu(input_ids=ids.cuda()).logits.float().cpu()
    error = rel_err(logits, expected)
    assert error < 1e-2, f"CUDA vs CPU LoRA forward: relative error {error:.3g}"
