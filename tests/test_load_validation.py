"""Bad input while loading a model, through the API: JSON files of the wrong shape, configs transformers rejects,
configs that do not describe the weights, and a tokenizer larger than the embedding. Each raises a
`QloraLiteError` subclass with one sentence naming the file, key or tensor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import qlora_lite
from qlora_lite import load_quantized
from qlora_lite.errors import DataError, ModelLoadError, QloraLiteError
from qlora_lite.io.safetensors import SafetensorsFile

from .bad_cases_loading import edit_header, edit_json, edit_tensors, grow_last_tensor, overlap_first_two, read_header

EMBED = "model.embed_tokens.weight"


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Callable[..., Path]:
    """model_copy(name="m", arch="llama") -> a fresh copy of a tiny model dir, to break."""

    def make(name: str = "m", arch: str = "llama") -> Path:
        return Path(shutil.copytree(tiny_model_dir(arch), tmp_path / name))

    return make


def refused(model_dir: Path, error: type[QloraLiteError], fragment: str, **kwargs: Any) -> str:
    """Load `model_dir` and return the message of the `error` it must raise (one sentence holding `fragment`)."""
    with pytest.raises(error) as info:
        load_quantized(model_dir, device="cpu", **kwargs)
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message and message.endswith((".", ".)")), message
    return message


def set_key(key: str, value: Any) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        if value is None:
            data.pop(key)
        else:
            data[key] = value

    return change


# ------------------------------------------------------------------------------ JSON of the wrong shape


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda d: [d], "config.json holds a list where a model config must be a JSON object"),
        (lambda d: "llama", "config.json holds a string where a model config must be a JSON object"),
        (set_key("hidden_size", "64"), '"hidden_size" is "64" (a string) but must be a whole number of at least 1'),
        (set_key("num_hidden_layers", 2.5), '"num_hidden_layers" is 2.5 (a number) but must be a whole number'),
        (set_key("num_attention_heads", True), '"num_attention_heads" is true (true/false) but must be a whole number'),
        (set_key("rms_norm_eps", "1e-6"), '"rms_norm_eps" is "1e-6" (a string) but must be a number'),
        (set_key("model_type", 5), '"model_type" is 5 (a whole number) but must be a string'),
        (set_key("auto_map", ["x"]), '"auto_map" is ["x"] (a list) but must be a JSON object'),
    ],
    ids=["list", "string", "size-string", "size-fraction", "size-bool", "eps-string", "model-type", "auto-map"],
)
def test_config_json_of_the_wrong_shape(model_copy, change, fragment):
    model_dir = model_copy()
    edit_json(model_dir / "config.json", change)
    message = refused(model_dir, ModelLoadError, fragment)
    assert str(model_dir / "config.json") in message and "fix config.json or re-download it." in message


def test_config_json_not_utf8(model_copy):
    model_dir = model_copy()
    (model_dir / "config.json").write_bytes(b'{"model_type": "llam\xe9"}')
    refused(model_dir, ModelLoadError, "config.json is not UTF-8 text (invalid continuation byte at byte 20)")


@pytest.mark.parametrize(
    "file,change,fragment",
    [
        ("tokenizer_config.json", lambda d: [d], "holds a list where a tokenizer config must be a JSON object"),
        ("tokenizer_config.json", set_key("chat_template", 5), '"chat_template" is 5 (a whole number)'),
        ("tokenizer_config.json", set_key("chat_template", [{"name": "default"}]), '"chat_template" is [{"name"'),
        ("tokenizer_config.json", set_key("model_max_length", "big"), '"model_max_length" is "big" (a string)'),
        ("tokenizer_config.json", set_key("pad_token", ["<pad>"]), '"pad_token" is ["<pad>"] (a list)'),
        ("tokenizer_config.json", set_key("added_tokens_decoder", [1]), '"added_tokens_decoder" is [1] (a list)'),
        ("tokenizer.json", lambda d: [d], "tokenizer.json holds a list where a tokenizer's tokenizer.json must be"),
        ("tokenizer.json", set_key("model", "BPE"), '"model" is "BPE" (a string) but must be a JSON object'),
        ("tokenizer.json", lambda d: d["model"].update(vocab=5), "cannot be loaded (invalid type: integer `5`"),
    ],
    ids=["config-list", "template-number", "template-list", "max-length", "pad-list", "decoder", "json-list",
         "json-model", "json-unparsable"],
)  # fmt: skip
def test_tokenizer_files_of_the_wrong_shape(model_copy, file, change, fragment):
    model_dir = model_copy()
    (model_dir / "chat_template.jinja").unlink()  # it would override tokenizer_config.json's chat_template
    edit_json(model_dir / file, change)
    message = refused(model_dir, DataError, fragment)
    assert str(model_dir) in message


def test_tokenizer_not_json(model_copy):
    model_dir = model_copy()
    (model_dir / "tokenizer_config.json").write_text("{oops")
    refused(model_dir, DataError, "tokenizer_config.json is not valid JSON (Expecting property name")


def _sharded(model_dir: Path, change: Callable[[dict], Any]) -> Path:
    shard = "model-00001-of-00001.safetensors"
    (model_dir / "model.safetensors").rename(model_dir / shard)
    keys = [k for k in read_header(model_dir / shard)[0] if k != "__metadata__"]
    index = model_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, shard)}))
    edit_json(index, change)
    return model_dir


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda d: [d], "model.safetensors.index.json holds a list where a safetensors index must be a JSON object"),
        (set_key("weight_map", None), 'has no "weight_map" (a JSON object is needed)'),
        (lambda d: d.update(weight_map=list(d["weight_map"])), '"weight_map" is ["lm_head.weight",'),
        (lambda d: d.update(weight_map={}), '"weight_map" lists no tensors'),
        (lambda d: d["weight_map"].update({EMBED: 7}), f"maps '{EMBED}' to 7 (a whole number), not to the file name"),
        (lambda d: d["weight_map"].update({EMBED: "../x.safetensors"}), 'to "../x.safetensors" (a string), not to'),
    ],
    ids=["list", "no-weight-map", "weight-map-list", "empty", "value-number", "value-path"],
)
def test_shard_index_of_the_wrong_shape(model_copy, change, fragment):
    model_dir = _sharded(model_copy(), change)
    message = refused(model_dir, ModelLoadError, fragment)
    assert message.endswith("re-save the model or re-download the index.")


def test_sharded_model_still_loads(model_copy):
    model, _ = load_quantized(_sharded(model_copy(), lambda d: None), device="cpu")
    assert model.qlora_targets


def _entry(field: str, value: Any) -> Callable[[dict], None]:
    def change(header: dict) -> None:
        header[EMBED][field] = value

    return change


def _gap(header: dict) -> None:
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] > 0:
            entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda h: [h], "(a list where an object of tensors must be)"),
        (_entry("data_offsets", [0]), f"tensor '{EMBED}' has data_offsets [0], not [begin, end]"),
        (_entry("data_offsets", [0, "8"]), f"tensor '{EMBED}' has data_offsets [0, \"8\"], not [begin, end]"),
        (_entry("data_offsets", [8, 0]), "not [begin, end] with 0 <= begin <= end"),
        (_entry("shape", [-320, 64]), f"tensor '{EMBED}' has shape [-320, 64], not a list of non-negative"),
        (_entry("shape", ["320", "64"]), "has shape [\"320\", \"64\"], not a list of non-negative whole numbers"),
        (_entry("shape", 320), "has shape 320, not a list"),
        (_entry("shape", [320, 32]), f"tensor '{EMBED}' has 81920 bytes for F32 shape [320, 32], which needs 40960"),
        (_entry("dtype", "Q4"), f"tensor '{EMBED}' has dtype \"Q4\", which is not one of F64"),
        (lambda h: h.update({EMBED: [1, 2]}), f"tensor '{EMBED}' is a list, not an object"),
        (lambda h: h.update(__metadata__={"format": 5}), "__metadata__ is {\"format\": 5}, not an object of strings"),
        (overlap_first_two, "overlaps tensor"),
        (_gap, "4 unused bytes lie before tensor"),
    ],
    ids=["list", "offsets-one", "offsets-string", "offsets-reversed", "shape-negative", "shape-strings",
         "shape-number", "size-disagrees", "dtype", "entry-list", "metadata", "overlap", "gap"],
)  # fmt: skip
def test_safetensors_header_of_the_wrong_shape(model_copy, change, fragment):
    model_dir = model_copy()
    edit_header(model_dir / "model.safetensors", change)
    message = refused(model_dir, ModelLoadError, fragment)
    assert message.startswith(f"{model_dir / 'model.safetensors'} has a malformed safetensors header (")
    assert message.endswith("; re-save or re-download the file.")


def test_safetensors_offsets_beyond_the_file_and_trailing_bytes(model_copy):
    model_dir = model_copy()
    edit_header(model_dir / "model.safetensors", grow_last_tensor)
    refused(model_dir, ModelLoadError, "model.safetensors ends early; the file is truncated")
    model_dir = model_copy("trailing")
    with open(model_dir / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    refused(model_dir, ModelLoadError, "(16 bytes follow the last tensor)")


def test_the_safetensors_library_refuses_what_our_reader_refuses(model_copy):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = model_copy()
    edit_header(model_dir / "model.safetensors", overlap_first_two)
    with pytest.raises(SafetensorError):
        load_file(str(model_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="overlaps tensor"):
        SafetensorsFile(model_dir / "model.safetensors")


# ------------------------------------------------------------------- configs transformers' validation rejects


@pytest.mark.parametrize(
    "change,fragment",
    [
        (set_key("num_attention_heads", 5), "is not a valid 'llama' config (The hidden size (64) is not a multiple of"),
        (set_key("vocab_size", -320), '"vocab_size" is -320 (a whole number) but must be a whole number of at least 1'),
        (set_key("rope_parameters", "yes"), "is not a valid 'llama' config (Field 'rope_parameters'"),
    ],
    ids=["heads", "negative-vocab", "strict-field"],
)
def test_config_transformers_rejects(model_copy, change, fragment):
    model_dir = model_copy()
    edit_json(model_dir / "config.json", change)
    refused(model_dir, ModelLoadError, fragment)


def test_memory_configs_from_files_dicts_and_objects_are_checked(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig

    from qlora_lite.memory.inventory import build_inventory, resolve_config

    good = json.loads((tiny_model_dir("llama") / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"the config dict is not a valid 'llama' config \(The hidden size"):
        resolve_config({**good, "num_attention_heads": 5})
    with pytest.raises(ModelLoadError, match='the config dict: "hidden_size" is "64" \\(a string\\)'):
        resolve_config({**good, "hidden_size": "64"})
    with pytest.raises(ModelLoadError, match="declares model_type 'alien-lm', which transformers does not know"):
        resolve_config({**good, "model_type": "alien-lm"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps([good]))
    with pytest.raises(ModelLoadError, match="holds a list where a Hugging Face config.json must be a JSON object"):
        resolve_config(path)
    bad = LlamaConfig(**{k: v for k, v in good.items() if k not in ("model_type", "architectures")})
    bad.vocab_size = -5  # a config object skips the JSON checks; building the skeleton refuses it
    with pytest.raises(ModelLoadError, match="transformers cannot build a causal LM from .*negative dimension"):
        build_inventory(bad)
    assert resolve_config("llama-3.2-1b")[0].hidden_size == 2048  # presets still build


# ------------------------------------------------------------------------ configs that do not match the weights


@pytest.mark.parametrize(
    "change,fragment",
    [
        (set_key("hidden_size", None), "lm_head.weight in model.safetensors has shape [320, 64] but config.json describes [320, 4096] (and 20 more"),
        (set_key("vocab_size", 300), "lm_head.weight in model.safetensors has shape [320, 64] but config.json describes [300, 64] (and 1 more: model.embed_tokens.weight)"),
        (set_key("intermediate_size", 128), "has shape [64, 192] but config.json describes [64, 128]"),
        (set_key("num_hidden_layers", 1), "model.layers.1.input_layernorm.weight in model.safetensors has no place in the model config.json describes"),
    ],
    ids=["no-hidden-size", "vocab", "intermediate", "fewer-layers"],
)  # fmt: skip
def test_config_that_does_not_describe_the_weights(model_copy, change, fragment):
    model_dir = model_copy()
    edit_json(model_dir / "config.json", change)
    message = refused(model_dir, ModelLoadError, fragment)
    assert message.endswith(
        f"the config.json in {model_dir} does not match its weights, so fix it or use the weights that came with it."
    )


def test_weights_that_do_not_fit_the_config(model_copy):
    model_dir = model_copy("rows")
    edit_tensors(model_dir / "model.safetensors", lambda t: t.update({EMBED: t[EMBED][:300].clone()}))
    refused(
        model_dir,
        ModelLoadError,
        f"{EMBED} in model.safetensors has shape [300, 64] but config.json describes [320, 64];",
    )

    model_dir = model_copy("int")
    key = "model.layers.0.mlp.up_proj.weight"
    edit_tensors(model_dir / "model.safetensors", lambda t: t.update({key: t[key].to(torch.int32)}))
    refused(
        model_dir,
        ModelLoadError,
        f"{key} in model.safetensors is I32 where the model has a floating-point tensor; the weights in",
    )

    model_dir = model_copy("missing")
    edit_tensors(model_dir / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    refused(
        model_dir, ModelLoadError, "has no tensor for model.norm.weight (1 missing in all); the weights do not belong"
    )

    model_dir = model_copy("twice")
    edit_tensors(model_dir / "model.safetensors", lambda t: None)
    shutil.copy(model_dir / "model.safetensors", model_dir / "model-copy.safetensors")
    refused(model_dir, ModelLoadError, "tensor lm_head.weight is in both model-copy.safetensors and model.safetensors")


def test_legacy_tensors_transformers_ignores_are_still_accepted(model_copy):
    model_dir = model_copy()
    edit_tensors(
        model_dir / "model.safetensors",
        lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}),
    )
    model, _ = load_quantized(model_dir, device="cpu")
    assert model.qlora_targets


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_tied_embeddings_need_only_one_tensor(model_copy, arch):
    model_dir = model_copy(arch=arch)
    keys = read_header(model_dir / "model.safetensors")[0]
    assert "lm_head.weight" not in keys  # the tied head is not stored, and is not missing
    model, _ = load_quantized(model_dir, device="cpu")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


# --------------------------------------------------------------------------- tokenizer larger than embedding


def test_tokenizer_larger_than_the_embedding_is_refused_before_training(model_copy, tmp_path):
    from transformers import AutoTokenizer

    model_dir = model_copy()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(70)])
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "train.jsonl").write_text('{"text": "hello world"}\n')
    config = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "train.jsonl"), "max_seq_len": 32},
        "train": {"max_steps": 1, "micro_batch_size": 1, "optimizer": "adamw"},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DataError) as info:
        qlora_lite.train(tmp_path / "run.yaml")
    assert str(info.value) == (
        f"the tokenizer in {model_dir} has 329 tokens but the model's embedding has 320 rows; "
        "use the tokenizer that came with the model, or set data.resize_embeddings: true to grow it."
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
