"""Bad input to the loader and to apply_lora: one sentence that names the problem and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from qlora_lite import apply_lora, load_quantized
from qlora_lite.errors import ConfigError, ModelLoadError


def one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith((".", ")")), message


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_quantized(tmp_path / "nope", device="cpu")
    assert str(tmp_path / "nope") in str(info.value)
    one_sentence(str(info.value))


def test_no_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="has no config.json") as info:
        load_quantized(tmp_path, device="cpu")
    one_sentence(str(info.value))


def test_pickle_only_weights_are_refused_with_conversion_hint(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    shutil.copy(tiny_model_dir("llama") / "config.json", model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(ModelLoadError) as info:
        load_quantized(model_dir, device="cpu")
    message = str(info.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "safe_serialization=True" in message
    one_sentence(message)


def test_corrupted_safetensors_header(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_quantized(model_dir, device="cpu")


def test_unknown_architecture(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "alien"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "alien-lm"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'alien-lm'"):
        load_quantized(model_dir, device="cpu")


def test_remote_code_model_is_refused_without_trust(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "remote"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_quantized(model_dir, device="cpu")


def test_unknown_target_module_lists_available(tiny_model_dir):
    with pytest.raises(ConfigError) as info:
        load_quantized(tiny_model_dir("llama"), device="cpu", target_modules=["q_proj", "query_key_value"])
    message = str(info.value)
    assert "'query_key_value'" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message
    one_sentence(message)


@pytest.mark.parametrize("bits", [2, 3, 5, 16])
def test_unsupported_bits(tiny_model_dir, bits):
    with pytest.raises(ConfigError, match=f"bits is {bits}.*use 4 or 8"):
        load_quantized(tiny_model_dir("llama"), bits=bits, device="cpu")


@pytest.fixture(scope="module")
def quantized_llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.mark.parametrize("r", [0, -4])
def test_rank_not_positive(quantized_llama, r):
    model, _ = load_quantized(quantized_llama, device="cpu")
    with pytest.raises(ConfigError, match=f"lora.r is {r}.*positive"):
        apply_lora(model, r=r)


def test_rank_larger_than_a_layer(quantized_llama):
    model, _ = load_quantized(quantized_llama, device="cpu")
    with pytest.raises(ConfigError) as info:
        apply_lora(model, r=40)  # k_proj / v_proj are [32 x 64]
    message = str(info.value)
    assert "smaller side (32)" in message and "k_proj" in message and "r <= 32" in message
    assert getattr(model, "qlora_lora", None) is None  # nothing was half-applied
