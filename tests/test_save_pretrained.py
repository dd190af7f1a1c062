"""`model.save_pretrained(...)` on a qlora-lite model (the peft habit) refuses and names the two ways to save."""

from __future__ import annotations

import pytest
import torch

import qlora_lite
from qlora_lite.errors import ExportError, QloraLiteError
from qlora_lite.model.loader import load_quantized
from qlora_lite.model.lora import apply_lora, lora_layers


@pytest.fixture
def adapted(tiny_model_dir):
    model, _ = load_quantized(tiny_model_dir("llama"), bits=4, device="cpu", load_tokenizer=False)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():  # B starts at zero; give the adapter an effect a lost weight would show
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    return model


def test_save_pretrained_refuses_and_names_save_adapter_and_export_merged(adapted, tmp_path):
    out = tmp_path / "saved"
    with pytest.raises(ExportError) as err:
        adapted.save_pretrained(out, safe_serialization=True)
    assert isinstance(err.value, QloraLiteError)
    text = str(err.value)
    assert "qlora_lite.save_adapter(model, dir)" in text and "qlora_lite.export_merged(base, adapter, out)" in text
    assert text.count(". ") == 0 and text.endswith(".")  # one sentence
    assert not out.exists()  # nothing half-written


def test_only_the_adapted_instance_refuses(adapted, tiny_model_dir, tmp_path):
    """The class is not patched: a plain transformers model of the same class still saves."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    assert type(plain) is type(adapted)
    plain.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").is_file()


def test_save_adapter_still_works_on_that_model(adapted, tiny_model_dir, tmp_path):
    out = qlora_lite.save_adapter(adapted, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    fresh, _ = load_quantized(tiny_model_dir("llama"), bits=4, device="cpu", load_tokenizer=False)
    qlora_lite.load_adapter(fresh, out)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, adapted.eval()(ids).logits)
    with pytest.raises(ExportError):  # a model that got its LoRA from load_adapter refuses too
        fresh.save_pretrained(tmp_path / "saved")
