"""Merged export: weights against an in-process reference (deq(W_q) + scaling·B·A), logits of the merged model
(loaded by plain transformers) against the quantized base + adapter, HF layout and sharding, GPT-2's Conv1D
layout, bounded memory measured from outside, and bad input (each a one-sentence QloraLiteError, CLI exit 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora_lite import apply_lora, load_quantized, save_adapter
from qlora_lite.cli import main
from qlora_lite.config.settings import QuantConfig
from qlora_lite.config.units import parse_size
from qlora_lite.errors import AdapterError, ExportError, QloraLiteError
from qlora_lite.export.adapter import QLORA_KEY
from qlora_lite.export.hf_dir import export_merged, run_export
from qlora_lite.export.merge import _dequantized_rows, quantize_4bit_chunked
from qlora_lite.export.verify import VERIFY_TOLERANCE, verify_merged
from qlora_lite.io.safetensors import SafetensorsFile
from qlora_lite.model.lora import lora_layers
from qlora_lite.model.quant import dequantize_module, quant_state_tensors, quantize_4bit
from tests.helpers import load_tool

SHARD = "200KB"  # the tiny models are ~0.5 MB in fp32, so this gives several input and output shards
FP16_ULP = 2**-10  # relative spacing of float16 (and a bound on one rounding of a bf16/fp16 cast: 2**-8 for bf16)


def randomize_adapter(model, seed: int = 1, scale: float = 0.05) -> None:
    """Give every LoRA B a non-zero value so the merge changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * scale)


def stored_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) HF model dir, read with the safetensors library."""
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Factory: (base_dir, adapter_dir, model) for an arch and quantization, with a random non-zero adapter."""
    cache: dict = {}

    def make(
        arch: str = "llama", bits: int = 4, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64
    ):
        key = (arch, bits, quant_type, double_quant, blocksize)
        if key not in cache:
            base = tiny_model_dir(arch, max_shard_size=SHARD)
            model, _ = load_quantized(
                base, bits=bits, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, device="cpu"
            )
            apply_lora(model, r=8, alpha=16, seed=0)
            randomize_adapter(model)
            adapter = save_adapter(model, tmp_path_factory.mktemp(f"adapter-{arch}-{bits}") / "adapter")
            cache[key] = (base, adapter, model)
        return cache[key]

    return make


QUANT_KINDS = {
    "nf4-dq": dict(bits=4, quant_type="nf4", double_quant=True),
    "fp4-b128": dict(bits=4, quant_type="fp4", double_quant=False, blocksize=128),
    "int8": dict(bits=8),
}


@pytest.mark.parametrize(
    "arch,kind", [("llama", "nf4-dq"), ("llama", "fp4-b128"), ("llama", "int8"), ("gpt2", "nf4-dq")]
)
def test_streamed_dequantization_is_bit_identical_to_loaded_layers(trained, arch, kind):
    base, _, model = trained(arch, **QUANT_KINDS[kind])
    settings = QuantConfig(**QUANT_KINDS[kind])
    checkpoint = stored_tensors(base)
    for name, layer in lora_layers(model).items():
        weight = checkpoint[f"{name}.weight"].to(torch.bfloat16)
        weight = weight.t() if arch == "gpt2" else weight  # Conv1D stores [in, out]
        streamed = _dequantized_rows(weight, settings, torch.device("cpu"))(slice(None))
        assert torch.equal(streamed, dequantize_module(layer.base_layer)), name


@pytest.mark.parametrize(
    "quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128), ("nf4", True, 256)]
)
def test_chunked_4bit_quantization_equals_bitsandbytes_whole_tensor(quant_type, double_quant, blocksize):
    weight = torch.randn(333, 97, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # n % blocksize != 0
    settings = QuantConfig(bits=4, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize)
    packed, state = quantize_4bit_chunked(weight, settings, chunk_elements=5 * blocksize)  # many chunks
    expected_packed, expected = quantize_4bit(weight, quant_type, double_quant, blocksize)
    assert torch.equal(packed, expected_packed)
    assert state.shape == expected.shape and state.dtype == expected.dtype and state.nested == expected.nested
    for ours, theirs in zip(quant_state_tensors(state), quant_state_tensors(expected), strict=True):
        assert torch.equal(ours, theirs)


def reference_merge(layer, dtype: torch.dtype) -> torch.Tensor:
    """deq(W_q) + scaling·B·A in fp32, cast: computed from the loaded model, not from the export's code path."""
    merged = dequantize_module(layer.base_layer) + layer.scaling * (
        layer.lora_B.weight.float() @ layer.lora_A.weight.float()
    )
    return merged.to(dtype)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_weights_equal_dequantized_plus_delta(trained, tmp_path, arch):
    base, adapter, model = trained(arch)
    # quantized on the CPU like the reference model, also on machines with a GPU
    out = export_merged(base, adapter, tmp_path / "merged", max_shard_size=SHARD, device="cpu")
    merged, original = stored_tensors(out), stored_tensors(base)
    assert set(merged) == set(original)  # the checkpoint's own key names, nothing added or lost
    layers = lora_layers(model)
    for key, tensor in merged.items():
        assert tensor.dtype == torch.float16, key
        assert tensor.shape == original[key].shape, key  # GPT-2's Conv1D weights stay [in, out]
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in layers:
            expected = reference_merge(layers[module], torch.float16)
            expected = expected.t() if arch == "gpt2" else expected
            torch.testing.assert_close(tensor, expected, rtol=FP16_ULP, atol=1e-7)
            assert not torch.equal(
                tensor, dequantize_module(layers[module].base_layer).to(torch.float16).reshape(tensor.shape)
            )
        else:
            assert torch.equal(tensor, original[key].to(torch.float16)), key


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_merged_model_logits_match_quantized_base_plus_adapter(trained, tmp_path, arch, dtype):
    base, adapter, _ = trained(arch)
    out = export_merged(base, adapter, tmp_path / "merged", dtype=dtype, max_shard_size=SHARD)
    check = verify_merged(out, base, adapter)
    assert check.dtype == dtype
    assert check.max_rel < VERIFY_TOLERANCE, check
    assert check.mean_rel <= check.max_rel


def test_quantized_layers_without_lora_are_written_dequantized(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama", max_shard_size=SHARD)
    model, _ = load_quantized(base, device="cpu")  # every linear quantized, as in training
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=0)
    randomize_adapter(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    merged = stored_tensors(export_merged(base, adapter, tmp_path / "merged", device="cpu"))
    layers = lora_layers(model)
    for name in model.qlora_targets:
        if name in layers:
            expected = reference_merge(layers[name], torch.float16)
        else:  # no adapter, but trained against the quantized weight: that is what the merged model gets
            expected = dequantize_module(model.get_submodule(name)).to(torch.float16)
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=FP16_ULP, atol=1e-7)
    assert verify_merged(tmp_path / "merged", base, adapter).max_rel < VERIFY_TOLERANCE


def test_8bit_merged_model_logits_match(trained, tmp_path):
    base, adapter, _ = trained("llama", bits=8)
    out = export_merged(base, adapter, tmp_path / "merged", max_shard_size=SHARD)
    assert verify_merged(out, base, adapter).max_rel < VERIFY_TOLERANCE


def test_merge_into_original_uses_checkpoint_weights(trained, tmp_path):
    base, adapter, model = trained("llama")
    out = export_merged(base, adapter, tmp_path / "merged", merge_into="original")
    merged, original = stored_tensors(out), stored_tensors(base)
    for name, layer in lora_layers(model).items():
        delta = layer.scaling * (layer.lora_B.weight.float() @ layer.lora_A.weight.float())
        expected = (original[f"{name}.weight"].float() + delta).to(torch.float16)
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=FP16_ULP, atol=1e-7)
    # merging into the full-precision weights drops the quantization error the adapter was trained with
    assert verify_merged(out, base, adapter).max_rel > VERIFY_TOLERANCE


def test_hf_layout_shards_config_and_tokenizer(trained, tmp_path):
    base, adapter, _ = trained("llama")
    result = run_export(base, adapter, tmp_path / "merged", dtype="bfloat16", max_shard_size=SHARD)
    out = result.path
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert result.shard_files == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:  # the safetensors library reads what we streamed
            assert f.metadata() == {"format": "pt"}
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * 2 for k in keys)
        assert size <= parse_size(SHARD, "max shard size") or len(keys) == 1
        assert all(index["weight_map"][k] == shard for k in keys)
        total += size
    assert index["metadata"]["total_size"] == total == result.total_bytes
    assert set(index["weight_map"]) == set(stored_tensors(base))

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    leftovers = [p.name for p in list(out.iterdir()) + list(out.parent.iterdir()) if p.name.startswith(".")]
    assert leftovers == []


def test_single_shard_when_under_the_limit(trained, tmp_path):
    base, adapter, _ = trained("llama")
    out = export_merged(base, adapter, tmp_path / "merged")  # default 5GB
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_adapter_records_quantization_for_export(trained):
    _, adapter, model = trained("llama", **QUANT_KINDS["fp4-b128"])
    record = json.loads((adapter / "adapter_config.json").read_text())[QLORA_KEY]
    assert (
        record["bits"] == 4
        and record["quant_type"] == "fp4"
        and record["double_quant"] is False
        and record["blocksize"] == 128
    )
    assert record["quantized_modules"] == model.qlora_targets


# ------------------------------------------------------------------------------------- float16 range
@pytest.fixture(scope="module")
def huge_base(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with one weight of the LAST layer scaled past float16's range, in several shards."""
    src = tiny_model_dir("llama", max_shard_size=SHARD)
    dst = tmp_path_factory.mktemp("huge") / "base"
    dst.mkdir()
    for path in src.iterdir():
        data = path.read_bytes()
        (dst / path.name).write_bytes(data)
    key = "model.layers.1.mlp.down_proj.weight"
    for path in dst.glob("*.safetensors"):
        tensors = load_file(str(path))
        if key in tensors:
            tensors[key] = tensors[key] * 1e7
            save_file(tensors, str(path), metadata={"format": "pt"})
    return dst, key


def test_value_beyond_float16_range_is_an_error_suggesting_bfloat16(trained, huge_base, tmp_path):
    base, key = huge_base
    _, adapter, _ = trained("llama")
    with pytest.raises(ExportError, match=r"beyond float16's range.*bfloat16") as err:
        export_merged(base, adapter, tmp_path / "merged", max_shard_size=SHARD)
    assert key in str(err.value)
    # the failure came after the first shards were written: nothing partial is left behind
    assert not (tmp_path / "merged").exists()
    assert list(tmp_path.iterdir()) == []
    assert export_merged(base, adapter, tmp_path / "merged", dtype="bfloat16", max_shard_size=SHARD).is_dir()


def test_failed_overwrite_keeps_the_previous_output(trained, huge_base, tmp_path):
    base, _ = huge_base
    good_base, adapter, _ = trained("llama")
    out = export_merged(good_base, adapter, tmp_path / "merged")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError):
        export_merged(base, adapter, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------------------ bad input
def test_adapter_of_another_shape_names_tensor_and_shapes(trained, tiny_model_dir, tmp_path):
    _, adapter, _ = trained("llama")
    narrow = tiny_model_dir("llama", hidden_size=32)
    with pytest.raises(AdapterError) as err:
        export_merged(narrow, adapter, tmp_path / "merged")
    found = re.search(
        r"adapter tensor '([^']+)' has shape (\[.*?\]) but the base weight '([^']+)' is (\[.*?\])", str(err.value)
    )
    assert found, err.value
    adapter_key, adapter_shape, base_key, base_shape = found.groups()
    assert adapter_shape == str(list(SafetensorsFile(adapter / "adapter_model.safetensors").shape(adapter_key)))
    assert base_shape == str(list(stored_tensors(narrow)[base_key].shape))
    assert not (tmp_path / "merged").exists()


def test_adapter_of_another_architecture(trained, tmp_path):
    _, adapter, _ = trained("gpt2")
    llama, _, _ = trained("llama")
    with pytest.raises(AdapterError, match=r"transformer\.h\.0\..* has no 2-D weight"):
        export_merged(llama, adapter, tmp_path / "merged")


def test_non_empty_output_dir_needs_overwrite(trained, tmp_path):
    base, adapter, _ = trained("llama")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"exists and is not empty.*--overwrite"):
        export_merged(base, adapter, out)
    assert (out / "notes.txt").read_text() == "keep me"
    export_merged(base, adapter, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_merged(base, adapter, empty) / "config.json").is_file()  # an empty dir is fine


def test_output_inside_the_base_is_refused(trained, tmp_path):
    base, adapter, _ = trained("llama")
    with pytest.raises(ExportError, match="holds the base model"):
        export_merged(base, adapter, base.parent, overwrite=True)


def test_missing_adapter_dir(trained, tmp_path):
    base, _, _ = trained("llama")
    with pytest.raises(AdapterError, match=r"adapter directory .*nope does not exist"):
        export_merged(base, tmp_path / "nope", tmp_path / "merged")


def test_base_without_safetensors(trained, tmp_path):
    base, adapter, _ = trained("llama")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((base / "config.json").read_bytes())
    with pytest.raises(QloraLiteError, match=r"no \*\.safetensors weight files"):
        export_merged(bare, adapter, tmp_path / "merged")


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(dtype="float32"), "use 'float16' or 'bfloat16'"),
    (dict(merge_into="fp32"), "use 'dequantized'"),
    (dict(max_shard_size="lots"), "not a size"),
])  # fmt: skip
def test_bad_options(trained, tmp_path, kwargs, pattern):
    base, adapter, _ = trained("llama")
    with pytest.raises(ExportError, match=pattern):
        export_merged(base, adapter, tmp_path / "merged", **kwargs)


def test_parse_size():
    what = "max shard size"
    assert parse_size("5GB", what) == 5 * 10**9 and parse_size("500MB", what) == 5 * 10**8
    assert (
        parse_size("2GiB", what) == 2 * 2**30 and parse_size(1234, what) == 1234 and parse_size("1.5kb", what) == 1500
    )


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_export_with_verify(trained, tmp_path, capsys):
    base, adapter, _ = trained("gpt2")
    out = tmp_path / "merged"
    rc = main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", "bfloat16",
               "--max-shard-size", SHARD, "--verify"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "largest relative logit difference" in printed and "recorded in the adapter" in printed
    assert len(list(out.glob("model-*.safetensors"))) >= 2


def test_cli_errors_exit_2_with_one_line(trained, tmp_path, capsys):
    base, adapter, _ = trained("llama")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "x").write_text("x")
    rc = main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "error:" in err and "--overwrite" in err
    rc = main(["export", "--base", str(base), "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- memory
MIB = 2**20
# The reader's dtype-conversion buffer (at most one tensor, 4 MiB here), bitsandbytes' temporaries for one
# 2^18-element quantization chunk (~5 MiB), one fp32 merge chunk and allocator slack. Measured: ~12 MiB in all.
FIXED_OVERHEAD = 32 * MIB


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads VmHWM from /proc")
def test_export_peak_rss_is_bounded(tmp_path):
    tool = load_tool("measure_export_memory")
    models = tool.make_models(tmp_path, hidden=512, layers=12, vocab=4096, shard_size="16MB")
    assert len(list(models["base"].glob("*.safetensors"))) >= 4
    tiny = (models["tiny_base"], models["tiny_adapter"])
    baseline, peak = tool.run_child("qlora", models["base"], models["adapter"], tmp_path / "out", "8MB", tiny)
    out = tmp_path / "out"
    output_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))  # ~74 MiB of fp16
    assert len(list(out.glob("*.safetensors"))) >= 8
    above = peak - baseline
    bound = tool.largest_file(out) + tool.largest_tensor_fp32(models["base"]) + FIXED_OVERHEAD
    assert above <= bound, f"peak {above / MIB:.0f} MiB above baseline > bound {bound / MIB:.0f} MiB"
    # an export that held the merged model, or even half of its shards, could not stay under this
    assert above < 0.4 * output_bytes, f"peak {above / MIB:.0f} MiB vs output {output_bytes / MIB:.0f} MiB"
