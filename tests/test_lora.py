"""LoRA over 4-bit and 8-bit bases: exactness at B = 0, numerics and gradients against an fp32 reference,
agreement with peft over bitsandbytes' Linear4bit, parameter counts, and no dequantized weight kept for backward."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_lite import apply_lora, load_quantized
from qlora_lite.model.lora import LoraLinear, count_parameters, linear_dims, lora_layers, trainable_summary
from qlora_lite.model.quant import dequantize_module, make_linear4bit, make_linear8bit, quantize_4bit, quantize_8bit
from tests.helpers import rel_err

BASES = ["nf4", "fp4", "nf4-nodq", "int8"]


def make_base(kind: str, out_features: int = 96, in_features: int = 128, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features)
    b = torch.randn(out_features, generator=g) * 0.1 if bias else None
    if kind == "int8":
        codes, scales = quantize_8bit(weight)
        return make_linear8bit(codes, scales, b, threshold=6.0)
    quant_type = kind.split("-")[0]
    double_quant = not kind.endswith("nodq")
    packed, state = quantize_4bit(weight, quant_type, double_quant)
    return make_linear4bit(packed, state, b, quant_type, double_quant)


def randomize_lora(layer: LoraLinear, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.2)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", BASES)
def test_zero_b_equals_base_exactly(kind):
    base = make_base(kind)
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16)
    layer = LoraLinear(base, r=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    for training in (False, True):  # 8-bit bases run a different kernel in train and eval mode
        layer.train(training)
        with torch.no_grad():
            expected = base(x)
            assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("kind", BASES)
def test_forward_and_gradients_match_fp32_reference(kind):
    base = make_base(kind)
    layer = LoraLinear(base, r=8, alpha=16).train()
    randomize_lora(layer)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, 128, generator=g).to(torch.bfloat16).requires_grad_(True)
    upstream = torch.randn(4, 10, 96, generator=g)

    out = layer(x)
    out.backward(upstream.to(out.dtype))

    w = dequantize_module(base)
    x32 = x.detach().float().requires_grad_(True)
    a32 = layer.lora_A.weight.detach().float().requires_grad_(True)
    b32 = layer.lora_B.weight.detach().float().requires_grad_(True)
    ref = x32 @ w.t() + base.bias.float() + layer.scaling * (x32 @ a32.t() @ b32.t())
    ref.backward(upstream)

    assert layer.lora_A.weight.dtype == torch.bfloat16 and layer.lora_B.weight.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 1e-2
    assert rel_err(layer.lora_A.weight.grad.float(), a32.grad) < 2e-2
    assert rel_err(layer.lora_B.weight.grad.float(), b32.grad) < 2e-2
    assert rel_err(x.grad.float(), x32.grad) < 2e-2


def _tensors_saved_for_backward(output: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the autograd graph behind `output` holds for backward, custom Functions' ctx included."""
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        values = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        for attr in ("saved_tensors", "tensors"):
            try:
                values.append(getattr(node, attr))
            except (AttributeError, RuntimeError):
                pass
        state = getattr(node, "state", None)
        if state is not None:
            values += [getattr(state, a, None) for a in ("CB", "SCB", "absmax")]
        for value in values:
            for item in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(item, torch.Tensor):
                    found.append(item)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return found


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_backward_keeps_no_dequantized_weight(kind):
    base = make_base(kind, out_features=96, in_features=128)
    layer = LoraLinear(base, r=8, alpha=16).train()
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16, requires_grad=True)
    saved = _tensors_saved_for_backward(layer(x))
    weight_numel = 96 * 128
    assert any(t.dtype in (torch.uint8, torch.int8) and t.numel() >= weight_numel // 2 for t in saved), (
        "walker saw no packed weight"
    )
    dense = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= weight_numel]
    assert dense == [], f"a dequantized weight is kept for backward: {dense}"


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def test_fresh_lora_model_equals_quantized_base(llama_dir):
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    base, _ = load_quantized(llama_dir, device="cpu")
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = apply_lora(base, r=8, alpha=16, seed=0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj"]])
def test_trainable_count_is_r_times_in_plus_out(llama_dir, target_modules):
    model, _ = load_quantized(llama_dir, device="cpu")
    r = 4
    apply_lora(model, r=r, alpha=8, target_modules=target_modules)
    layers = lora_layers(model)
    expected = sum(r * (layer.in_features + layer.out_features) for layer in layers.values())
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.lora_{ab}.weight" for name in layers for ab in "AB"
    }
    assert len(layers) == (14 if target_modules == "all-linear" else 4)
    assert trainable_summary(model).startswith(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
    )


def test_initialisation_like_peft(llama_dir):
    model, _ = load_quantized(llama_dir, device="cpu")
    apply_lora(model, r=16, alpha=32, seed=0)
    layer = model.model.layers[0].mlp.down_proj
    a = layer.lora_A.weight.float()
    bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) bound = sqrt(6 / (6 * fan_in))
    assert a.abs().max() <= bound * 1.01
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)  # uniform(-b, b) has std b/sqrt(3)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.scaling == 2.0


def test_rslora_scaling(llama_dir):
    model, _ = load_quantized(llama_dir, device="cpu")
    apply_lora(model, r=16, alpha=32, rslora=True)
    assert model.model.layers[0].self_attn.q_proj.scaling == pytest.approx(32 / 4)


def test_same_adapters_in_peft_give_same_output(llama_dir):
    from peft import LoraConfig, get_peft_model

    from tests.test_loader import reference_model

    ours, _ = load_quantized(llama_dir, device="cpu")
    apply_lora(ours, r=8, alpha=16, seed=0)
    for layer in lora_layers(ours).values():
        randomize_lora(layer, seed=hash(layer.in_features) % 100)
    peft_model = get_peft_model(
        reference_model(llama_dir, 4), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            for ab in ("A", "B"):
                key = f"base_model.model.{name}.lora_{ab}.default.weight"
                # peft upcasts adapters to fp32 by default; give it ours as they are, in bf16
                peft_params[key].data = getattr(layer, f"lora_{ab}").weight.detach().clone()
    ours.eval()
    peft_model.eval()
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(input_ids=ids).logits.float()
        expected = peft_model(input_ids=ids).logits.float()
    # measured: 0.0 (bit-identical logits, input seeds 0-5, CPU). Same bnb base and bf16 adapters, so any real
    # difference is far above 1e-6: one bf16 ulp on one lora_B element gives 6.4e-3, fp32 adapters in peft 1.4e-2.
    assert rel_err(logits, expected) < 1e-6


def test_linear_dims_of_conv1d():
    from transformers.pytorch_utils import Conv1D

    assert linear_dims(Conv1D(nf=48, nx=32)) == (32, 48)
