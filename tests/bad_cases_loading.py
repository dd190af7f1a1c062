"""Bad-input cases for model directories, config.json, tokenizers, safetensors files and weights; appended to `tests/test_bad_input.py`'s table (see bad_input_support).

The helpers (`edit_json`, `edit_header`, `edit_tensors`) break one file of a model copy; test_load_validation.py
uses them too.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .bad_input_support import Case, Workspace

MODEL = "model.safetensors"


def edit_json(path: Path, change: Callable[[Any], Any]) -> Path:
    """Rewrite a JSON file with `change(data)` (its return value, or the data changed in place when it returns None)."""
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))
    return path


def read_header(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's parsed header and the bytes after it."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def edit_header(path: Path, change: Callable[[dict], Any]) -> Path:
    """Rewrite a safetensors file's header with `change(header)`, the tensor data kept byte for byte."""
    header, data = read_header(path)
    result = change(header)
    encoded = json.dumps(header if result is None else result).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def edit_tensors(path: Path, change: Callable[[dict], None]) -> Path:
    """Re-save a safetensors file after `change(tensors)` edited its dict of tensors in place."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def grow_last_tensor(header: dict) -> None:
    """Double the first dimension of the tensor stored last, its offsets following, so they end beyond the file."""
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    entry = header[name]
    begin, end = entry["data_offsets"]
    entry["shape"] = [entry["shape"][0] * 2, *entry["shape"][1:]]
    entry["data_offsets"] = [begin, begin + 2 * (end - begin)]


def overlap_first_two(header: dict) -> None:
    """Point the second tensor's data at the first one's (shapes and sizes kept consistent)."""
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    a, b = header[first], header[second]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


def _copy(ws: Workspace, name: str, *, drop_template: bool = False) -> Path:
    dst = ws.model_copy(name)
    if drop_template:  # the .jinja file overrides tokenizer_config.json's chat_template
        (dst / "chat_template.jinja").unlink()
    return dst


def _json(
    name: str, file: str, change: Callable[[Any], Any], command: str = "train", drop_template: bool = False
) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        dst = _copy(ws, name, drop_template=drop_template)
        edit_json(dst / file, change)
        return _command(ws, dst, command)

    return build


def _header(name: str, change: Callable[[dict], Any], command: str = "train") -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        dst = _copy(ws, name)
        edit_header(dst / MODEL, change)
        return _command(ws, dst, command)

    return build


def _tensors(name: str, change: Callable[[dict], None]) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        dst = _copy(ws, name)
        edit_tensors(dst / MODEL, change)
        return ws.train(model=str(dst))

    return build


def _command(ws: Workspace, model: Path, command: str) -> list[str]:
    if command == "memory":
        return ["memory", str(model)]
    if command == "memory-file":
        return ["memory", str(model / "config.json")]
    if command == "export":
        return ws.export(base=model)
    return ws.train(model=str(model))


def _sharded(change: Callable[[dict], Any]) -> Callable[[Workspace], list[str]]:
    """A model whose weights sit in one shard named by an index, the index then changed."""

    def build(ws: Workspace) -> list[str]:
        dst = _copy(ws, "sharded")
        shard = "model-00001-of-00001.safetensors"
        (dst / MODEL).rename(dst / shard)
        keys = [k for k in read_header(dst / shard)[0] if k != "__metadata__"]
        index = {"metadata": {}, "weight_map": dict.fromkeys(keys, shard)}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
        edit_json(dst / "model.safetensors.index.json", change)
        return ws.train(model=str(dst))

    return build


def _bigger_tokenizer(ws: Workspace) -> list[str]:
    from transformers import AutoTokenizer

    dst = _copy(ws, "bigtok")
    tokenizer = AutoTokenizer.from_pretrained(dst)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(70)])  # 259 + 70 = 329 > the embedding's 320 rows
    tokenizer.save_pretrained(dst)
    return ws.train(model=str(dst))


def _set(key: str, value: Any) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        if value is None:
            del data[key]
        else:
            data[key] = value

    return change


def _entry(field: str, value: Any) -> Callable[[dict], None]:
    """Set one field of the embedding's header entry."""

    def change(header: dict) -> None:
        header["model.embed_tokens.weight"][field] = value

    return change


def _int_weight(tensors: dict) -> None:
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].round().to(torch.int32)


MALFORMED = "has a malformed safetensors header"
CONFIG_MISMATCH = "the config.json in ./{} does not match its weights, so fix it or use the weights that came with it."

CASES: list[Case] = [
    # ------------------------------------------------------------------ JSON files of the wrong shape
    Case(
        "model-config-a-list",
        "a config.json holding a JSON list",
        _json("cfglist", "config.json", lambda data: [data]),
        "./cfglist/config.json holds a list where a model config must be a JSON object; fix config.json or re-download it.",
    ),
    Case(
        "model-config-size-a-string",
        'a config.json size written as a string ("hidden_size": "64")',
        _json("strsize", "config.json", _set("hidden_size", "64")),
        './strsize/config.json: "hidden_size" is "64" (a string) but must be a whole number of at least 1; '
        "fix config.json or re-download it.",
    ),
    Case(
        "model-config-flag-a-string",
        'a config.json flag written as a string ("tie_word_embeddings": "false")',
        _json("strflag", "config.json", _set("tie_word_embeddings", "false")),
        './strflag/config.json: "tie_word_embeddings" is "false" (a string) but must be true or false;',
    ),
    Case(
        "memory-config-size-a-string",
        "`memory` on a model dir whose config.json has a size written as a string",
        _json("strsize", "config.json", _set("num_hidden_layers", "two"), command="memory"),
        './strsize/config.json: "num_hidden_layers" is "two" (a string) but must be a whole number of at least 1;',
    ),
    Case(
        "memory-config-file-a-list",
        "`memory` on a config.json file holding a JSON list",
        _json("cfglist", "config.json", lambda data: [data], command="memory-file"),
        "./cfglist/config.json holds a list where a Hugging Face config.json must be a JSON object; give a valid config.json.",
    ),
    Case(
        "tokenizer-config-a-list",
        "a tokenizer_config.json holding a JSON list",
        _json("toklist", "tokenizer_config.json", lambda data: [data]),
        "./toklist/tokenizer_config.json holds a list where a tokenizer config must be a JSON object; "
        "fix or re-download the tokenizer files.",
    ),
    Case(
        "tokenizer-chat-template-a-number",
        "a tokenizer_config.json whose chat_template is a number",
        _json("tpl", "tokenizer_config.json", _set("chat_template", 5), drop_template=True),
        './tpl/tokenizer_config.json: "chat_template" is 5 (a whole number) but must be a string, or a list of',
    ),
    Case(
        "tokenizer-special-token-a-number",
        "a tokenizer_config.json whose eos_token is a number",
        _json("eos", "tokenizer_config.json", _set("eos_token", 2)),
        './eos/tokenizer_config.json: "eos_token" is 2 (a whole number) but must be a string or an object with a "content" string;',
    ),
    Case(
        "tokenizer-json-unreadable-model",
        "a tokenizer.json whose model the tokenizers library cannot parse",
        _json("tokjson", "tokenizer.json", lambda data: data["model"].update(vocab=5)),
        "the tokenizer in ./tokjson cannot be loaded (",
    ),
    Case(
        "model-index-weight-map-a-list",
        "a shard index whose weight_map is a list",
        _sharded(lambda index: index.update(weight_map=list(index["weight_map"].values()))),
        './sharded/model.safetensors.index.json: "weight_map" is ["model-00001-of-00001.safetensors",...] (a list) '
        "but must be a JSON object; re-save the model or re-download the index.",
    ),
    Case(
        "model-index-value-not-a-file-name",
        "a shard index mapping a tensor to a number",
        _sharded(lambda index: index["weight_map"].update({"lm_head.weight": 5})),
        "./sharded/model.safetensors.index.json: \"weight_map\" maps 'lm_head.weight' to 5 (a whole number), "
        "not to the file name of a shard beside the index; re-save the model or re-download the index.",
    ),
    Case(
        "model-header-a-list",
        "a safetensors header holding a list",
        _header("hdrlist", lambda header: [header]),
        f"./hdrlist/model.safetensors {MALFORMED} (a list where an object of tensors must be); re-save or re-download the file.",
    ),
    Case(
        "model-header-offsets-not-two",
        "a tensor whose data_offsets is not two whole numbers",
        _header("offsets", _entry("data_offsets", [0])),
        f"./offsets/model.safetensors {MALFORMED} (tensor 'model.embed_tokens.weight' has data_offsets [0], "
        "not [begin, end] with 0 <= begin <= end)",
    ),
    Case(
        "model-header-negative-shape",
        "a tensor shape with a negative size",
        _header("negshape", _entry("shape", [-320, 64])),
        "(tensor 'model.embed_tokens.weight' has shape [-320, 64], not a list of non-negative whole numbers)",
    ),
    Case(
        "model-header-shape-strings",
        "a tensor shape written as strings",
        _header("strshape", _entry("shape", ["320", "64"])),
        '(tensor \'model.embed_tokens.weight\' has shape ["320", "64"], not a list of non-negative whole numbers)',
    ),
    Case(
        "model-header-unknown-dtype",
        "a tensor of a dtype safetensors does not define",
        _header("dtype", _entry("dtype", "Q4")),
        "(tensor 'model.embed_tokens.weight' has dtype \"Q4\", which is not one of F64, F32,",
    ),
    Case(
        "model-header-overlapping-offsets",
        "two tensors whose data overlap",
        _header("overlap", overlap_first_two),
        "overlaps tensor",
    ),
    Case(
        "model-header-beyond-the-file",
        "a tensor whose data_offsets end beyond the file",
        _header("beyond", grow_last_tensor),
        "./beyond/model.safetensors ends early; the file is truncated, re-save or re-download it.",
    ),
    Case(
        "export-base-header-overlapping-offsets",
        "`export --base` on a base whose safetensors tensors overlap",
        _header("overlap", overlap_first_two, command="export"),
        f"./overlap/model.safetensors {MALFORMED} (tensor",
    ),
    # ------------------------------------------------------------- configs transformers' validation rejects
    Case(
        "model-config-heads-do-not-divide",
        "a config.json whose attention heads do not divide the hidden size",
        _json("heads", "config.json", _set("num_attention_heads", 5)),
        "./heads/config.json is not a valid 'llama' config (The hidden size (64) is not a multiple of the number of "
        "attention heads (5)); fix config.json or re-download it.",
    ),
    Case(
        "model-config-negative-vocab",
        "a config.json with a negative vocabulary size",
        _json("negvocab", "config.json", _set("vocab_size", -320)),
        './negvocab/config.json: "vocab_size" is -320 (a whole number) but must be a whole number of at least 1;',
    ),
    Case(
        "model-config-rope-a-string",
        "a config.json field transformers' strict validation rejects (rope_parameters a string)",
        _json("rope", "config.json", _set("rope_parameters", "yes")),
        "./rope/config.json is not a valid 'llama' config (Field 'rope_parameters' with value 'yes'",
    ),
    Case(
        "memory-config-heads-do-not-divide",
        "`memory` on a config.json file whose attention heads do not divide the hidden size",
        _json("heads", "config.json", _set("num_attention_heads", 5), command="memory-file"),
        "./heads/config.json is not a valid 'llama' config (The hidden size (64) is not a multiple",
    ),
    # --------------------------------------------------------------- configs that do not describe the weights
    Case(
        "model-config-without-hidden-size",
        "a config.json without hidden_size (transformers would use its default of 4096)",
        _json("nohidden", "config.json", _set("hidden_size", None)),
        "lm_head.weight in model.safetensors has shape [320, 64] but config.json describes [320, 4096] (and 20 more:",
    ),
    Case(
        "model-embedding-of-another-size",
        "an embedding with fewer rows than the config's vocab_size",
        _tensors(
            "emb", lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:300].clone()})
        ),
        "model.embed_tokens.weight in model.safetensors has shape [300, 64] but config.json describes [320, 64]; "
        + CONFIG_MISMATCH.format("emb"),
    ),
    Case(
        "model-checkpoint-has-more-layers",
        "a checkpoint with more layers than config.json declares",
        _json("shallow", "config.json", _set("num_hidden_layers", 1)),
        "model.layers.1.input_layernorm.weight in model.safetensors has no place in the model config.json describes "
        "(and 8 more:",
    ),
    Case(
        "model-weight-of-wrong-size",
        "an intermediate_size that differs from the MLP weights",
        _json("inter", "config.json", _set("intermediate_size", 128)),
        "has shape [64, 192] but config.json describes [64, 128]",
    ),
    Case(
        "export-base-weight-of-wrong-size",
        "`export --base` on a base whose config.json does not describe its weights",
        _json("inter", "config.json", _set("intermediate_size", 128), command="export"),
        "has shape [64, 192] but config.json describes [64, 128]",
    ),
    Case(
        "model-weight-integer",
        "an integer tensor where a float weight is",
        _tensors("intw", _int_weight),
        "model.layers.0.mlp.up_proj.weight in model.safetensors is I32 where the model has a floating-point tensor; "
        "the weights in ./intw are not a checkpoint of this model, re-save or re-download them.",
    ),
    Case(
        "model-weight-missing",
        "a checkpoint without the final norm",
        _tensors("nonorm", lambda t: t.pop("model.norm.weight")),
        "the checkpoint in ./nonorm has no tensor for model.norm.weight (1 missing in all); the weights do not belong to this config.json.",
    ),
    # ------------------------------------------------------------------------ tokenizer and model disagree
    Case(
        "tokenizer-larger-than-embedding",
        "a tokenizer with more tokens than the model's embedding has rows",
        _bigger_tokenizer,
        "the tokenizer in ./bigtok has 329 tokens but the model's embedding has 320 rows",
    ),
]

CASES.append(
    Case(
        "memory-empty-budget",
        "an empty --gpu-memory",
        lambda ws: ["memory", "llama-3.2-1b", "--gpu-memory", ""],
        "GPU memory '' is not a size or a known GPU",
    )
)
