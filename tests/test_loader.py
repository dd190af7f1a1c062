"""The streaming quantized loader against transformers' own BitsAndBytesConfig load of the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_lite import load_quantized
from qlora_lite.model.quant import is_quantized_linear
from tests.helpers import rel_err

SETTINGS_4BIT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def reference_model(model_dir, bits: int, quant_type: str = "nf4", double_quant: bool = True):
    """transformers + bitsandbytes load with the same settings, compute dtype bf16."""
    config = BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
    )
    # bitsandbytes repacks 4-bit weights for an AVX512-BF16 inference kernel at the first eval forward on
    # such CPUs; both sides must run the same matmul kernel for a 1e-3 comparison (the GPU path never repacks).
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def compare_with_transformers(model_dir, bits: int, quant_type: str = "nf4", double_quant: bool = True) -> None:
    ours, tokenizer = load_quantized(
        model_dir, bits=bits, quant_type=quant_type, double_quant=double_quant, device="cpu"
    )
    ref = reference_model(model_dir, bits, quant_type, double_quant)
    ref_modules = dict(ref.named_modules())

    assert ours.qlora_targets, "no layer was quantized"
    for name in ours.qlora_targets:
        mine, theirs = ours.get_submodule(name), ref_modules[name]
        assert type(mine) is type(theirs), name
        assert torch.equal(mine.weight.data, theirs.weight.data), f"packed bytes differ in {name}"
        if bits == 4:
            assert torch.equal(mine.weight.quant_state.absmax, theirs.weight.quant_state.absmax), name
        else:
            assert torch.equal(mine.weight.SCB, theirs.weight.SCB), name
    ref_targets = {n for n, m in ref_modules.items() if is_quantized_linear(m)}
    assert set(ours.qlora_targets) == ref_targets

    for name, param in ours.named_parameters():
        if not is_quantized_linear(ours.get_submodule(name.rpartition(".")[0])):
            assert param.dtype == torch.bfloat16, name
            assert torch.equal(param, ref.get_parameter(name)), name
    ref_buffers = dict(ref.named_buffers())
    for name, buf in ours.named_buffers():
        assert torch.allclose(buf.float(), ref_buffers[name].float(), rtol=0, atol=0), name

    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(input_ids=ids).logits.float()
        expected = ref(input_ids=ids).logits.float()
    assert rel_err(logits, expected) < 1e-3
    assert tokenizer is not None and tokenizer.decode(tokenizer("abc").input_ids) == "abc"


@pytest.mark.parametrize("quant_type,double_quant", SETTINGS_4BIT)
def test_llama_4bit_matches_transformers(tiny_model_dir, quant_type, double_quant):
    compare_with_transformers(tiny_model_dir("llama"), 4, quant_type, double_quant)


def test_llama_8bit_matches_transformers(tiny_model_dir):
    compare_with_transformers(tiny_model_dir("llama"), 8)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gpt2", "gemma", "phi3"])
def test_architectures_4bit_match_transformers(tiny_model_dir, arch):
    compare_with_transformers(tiny_model_dir(arch), 4, "nf4", True)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_architectures_8bit_match_transformers(tiny_model_dir, arch):
    compare_with_transformers(tiny_model_dir(arch), 8)


def test_gqa_shapes_and_qwen_biases(tiny_model_dir):
    model, _ = load_quantized(tiny_model_dir("qwen2"), device="cpu")
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 16 and attn.q_proj.out_features == 64  # 2 kv heads of 4, head_dim 16
    assert attn.q_proj.bias is not None and attn.q_proj.bias.dtype == torch.bfloat16
    assert attn.o_proj.bias is None


@pytest.mark.parametrize("arch", ["qwen2", "gemma", "gpt2"])
def test_tied_embeddings_stay_tied(tiny_model_dir, arch):
    model, _ = load_quantized(tiny_model_dir(arch), device="cpu")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_untied_lm_head_is_bf16_and_unquantized(tiny_model_dir):
    model, _ = load_quantized(tiny_model_dir("llama"), device="cpu")
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert "lm_head" not in model.qlora_targets
    assert all(not p.requires_grad for p in model.parameters())


def test_gpt2_conv1d_becomes_linear_with_transposed_weight(tiny_model_dir):
    from qlora_lite.io.safetensors import SafetensorsFile
    from qlora_lite.model.quant import dequantize_module, quantize_4bit

    model_dir = tiny_model_dir("gpt2")
    model, _ = load_quantized(model_dir, device="cpu")
    layer = model.transformer.h[0].mlp.c_fc
    stored = SafetensorsFile(model_dir / "model.safetensors").read("transformer.h.0.mlp.c_fc.weight")
    assert layer.in_features == stored.shape[0] and layer.out_features == stored.shape[1]  # Conv1D is [in, out]
    packed, _ = quantize_4bit(stored.t())
    assert torch.equal(layer.weight.data, packed)
    assert dequantize_module(layer).shape == (stored.shape[1], stored.shape[0])


def test_sharded_checkpoint_loads_like_single_file(tiny_model_dir, tmp_path):
    from qlora_lite.model.tiny import save_tiny_model

    sharded = save_tiny_model(tmp_path / "sharded", "llama", max_shard_size="60KB")
    assert len(list(sharded.glob("*.safetensors"))) >= 4
    a, _ = load_quantized(sharded, device="cpu")
    b, _ = load_quantized(tiny_model_dir("llama"), device="cpu")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_target_list_and_regex_select_layers(tiny_model_dir):
    model, _ = load_quantized(tiny_model_dir("llama"), device="cpu", target_modules=["q_proj", "v_proj"])
    assert sorted(model.qlora_targets) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # untargeted stays bf16 Linear
    model, _ = load_quantized(tiny_model_dir("llama"), device="cpu", target_modules=r".*\.1\.mlp\..*")
    assert sorted(model.qlora_targets) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]


def test_bf16_checkpoint_loads_same_bytes_as_fp32(tiny_model_dir, tmp_path):
    from qlora_lite.model.tiny import save_tiny_model

    bf16_dir = save_tiny_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    a, _ = load_quantized(bf16_dir, device="cpu")
    b, _ = load_quantized(tiny_model_dir("llama"), device="cpu")  # same seed, stored in fp32
    for name in a.qlora_targets:
        assert torch.equal(a.get_submodule(name).weight.data, b.get_submodule(name).weight.data), name
