"""Adapters in PEFT's format, both directions, against peft itself on a transformers 4-bit base, and the merged
export of a peft-saved adapter against peft's own merge_and_unload."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_lite import apply_lora, load_adapter, load_quantized, save_adapter
from qlora_lite.export.adapter import QLORA_KEY
from qlora_lite.export.hf_dir import run_export
from qlora_lite.export.verify import VERIFY_TOLERANCE, fixed_batch, verify_merged
from qlora_lite.model.lora import lora_layers
from tests.helpers import rel_err
from tests.test_export import FP16_ULP, randomize_adapter, stored_tensors

TOLERANCE = 1e-2  # relative logit error; peft computes the adapter in fp32 where we use bf16


def transformers_4bit(base) -> torch.nn.Module:
    """transformers' own 4-bit NF4 + double-quant load, with bitsandbytes' CPU repacking off (same kernel as ours)."""
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
    )
    return model


def no_repack(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def ours(tiny_model_dir, tmp_path_factory):
    """Factory: (base, adapter_dir, model) saved by qlora-lite with a random non-zero adapter."""
    cache = {}

    def make(arch: str):
        if arch not in cache:
            base = tiny_model_dir(arch)
            model, _ = load_quantized(base, device="cpu")
            apply_lora(model, r=8, alpha=16, seed=0)
            randomize_adapter(model, scale=0.05)  # moves the logits by ~85%
            cache[arch] = (base, save_adapter(model, tmp_path_factory.mktemp(f"ours-{arch}") / "adapter"), model)
        return cache[arch]

    return make


@pytest.fixture(scope="module")
def peft_saved(tiny_model_dir, tmp_path_factory):
    """Factory: (base, adapter_dir, peft model) - an adapter created and saved by peft on a transformers 4-bit base."""
    cache = {}

    def make(arch: str):
        if arch not in cache:
            base = tiny_model_dir(arch)
            targets = (
                ["c_attn", "c_proj", "c_fc"]
                if arch == "gpt2"
                else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            )
            torch.manual_seed(0)
            config = LoraConfig(
                r=8, lora_alpha=32, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"
            )
            model = no_repack(get_peft_model(transformers_4bit(base), config))
            out = tmp_path_factory.mktemp(f"peft-{arch}") / "adapter"
            model.save_pretrained(out)
            cache[arch] = (base, out, model)
        return cache[arch]

    return make


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_our_adapter_and_matches_our_logits(ours, arch):
    base, adapter, model = ours(arch)
    ids = fixed_batch(320, 2, 16)
    with warnings.catch_warnings(record=True):  # peft warns that it ignores our extra "qlora_lite" key
        warnings.simplefilter("always")
        reference = no_repack(PeftModel.from_pretrained(transformers_4bit(base), adapter))
    expected = logits(reference, ids)
    ours = logits(model, ids)
    assert rel_err(ours, expected) < TOLERANCE
    # the adapter changes the output well beyond that tolerance, so the match is not trivial
    with reference.disable_adapter():
        assert rel_err(logits(reference, ids), expected) > 5 * TOLERANCE
    # the residual is peft's fp32 upcast of the adapter: kept in bf16 like ours, peft computes the same numbers
    same_dtype = no_repack(PeftModel.from_pretrained(transformers_4bit(base), adapter, autocast_adapter_dtype=False))
    assert rel_err(ours, logits(same_dtype, ids)) < 1e-6


def test_peft_reads_our_adapter_config(ours):
    _, adapter, model = ours("llama")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        config = PeftConfig.from_pretrained(adapter)
    assert config.r == 8 and config.lora_alpha == 16 and config.peft_type == "LORA"
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not hasattr(config, QLORA_KEY)  # ignored by peft, kept in the file for our export
    assert json.loads((adapter / "adapter_config.json").read_text())[QLORA_KEY]["bits"] == 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_we_load_a_peft_adapter_and_match_peft_logits(peft_saved, arch):
    base, adapter, peft_model = peft_saved(arch)
    ids = fixed_batch(320, 2, 16)
    model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
    load_adapter(model, adapter)
    assert len(lora_layers(model)) == (8 if arch == "gpt2" else 14)
    expected = logits(peft_model, ids)
    # peft's adapter is fp32; load_adapter keeps it fp32, so both compute the same numbers
    assert rel_err(logits(model, ids), expected) < 1e-6
    with peft_model.disable_adapter():
        assert rel_err(logits(peft_model, ids), expected) > 5 * TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_of_peft_adapter_matches_peft_merge_and_unload(peft_saved, tmp_path, arch):
    base, adapter, _ = peft_saved(arch)
    result = run_export(base, adapter, tmp_path / "merged", merge_into="original")
    ours = stored_tensors(result.path)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: peft switches fan_in_fan_out on for Conv1D itself
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    theirs = merged.state_dict()
    assert result.merged_tensors == (8 if arch == "gpt2" else 14)
    for key, tensor in ours.items():
        assert tensor.shape == theirs[key].shape, key  # GPT-2's Conv1D [in, out] layout in both
        torch.testing.assert_close(tensor, theirs[key].to(torch.float16), rtol=FP16_ULP, atol=1e-7)


def test_export_of_peft_adapter_assumes_qlora_defaults(peft_saved, tmp_path):
    base, adapter, _ = peft_saved("llama")
    result = run_export(base, adapter, tmp_path / "merged")
    assert result.quant_recorded is False and result.quant.bits == 4 and result.quant.quant_type == "nf4"
    assert verify_merged(result.path, base, adapter).max_rel < VERIFY_TOLERANCE
