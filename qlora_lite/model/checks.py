"""Does a model directory describe one model? config.json's fields checked before transformers sees them,
every checkpoint tensor's name, shape and dtype compared with the meta-device skeleton before a weight is read,
and the tokenizer's JSON files checked for the kinds of values transformers reads.

transformers fills a missing size with its default and reports unexpected or missing tensors only as warnings;
here each becomes one sentence naming the file, the key or tensor, and what to do.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DataError, ModelLoadError
from ..io.json_files import field_error, read_json_object
from ..io.safetensors import SafetensorsFile

CONFIG_FIX = "fix config.json or re-download it"
# Sizes that build the model: a string, a fraction or a number below 1 can only fail later, or silently.
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "n_ctx",
)
SHOWN_NAMES = 2  # tensors named after the first in a mismatch message


def _strict_dataclass_error() -> tuple[type[BaseException], ...]:
    try:  # huggingface_hub's strict dataclasses validate transformers 5 configs
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


# What building a config from JSON values raises when they are wrong (not our bugs: the values come from the file).
CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    *_strict_dataclass_error(),
)
# Building the model from such a config also fails on negative or inconsistent sizes.
BUILD_ERRORS: tuple[type[BaseException], ...] = (*CONFIG_ERRORS, RuntimeError, IndexError)


def config_problem(exc: BaseException, limit: int = 200) -> str:
    """The telling part of a config error: the inner reason of a strict-dataclass error, else its first sentence."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # "Validation error for field 'hidden_size':" / "    TypeError: Field 'hidden_size' expected int, got str"
    text = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    text = re.sub(r"^\w*(Error|Exception): ", "", text)
    text = re.sub(r"<class '(?:[\w.]*\.)?(\w+)'>", r"\1", text)  # <class 'a.b.RopeParameters'> -> RopeParameters
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.lru_cache(maxsize=32)
def _defaults(model_type: str) -> dict[str, Any]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return dict(vars(CONFIG_MAPPING[model_type]()))
    except Exception:  # an unknown model_type or a config class without defaults: nothing to compare with
        return {}


def check_config_fields(data: dict, where: str | Path, prefix: str = "") -> None:
    """Refuse config.json fields of the wrong JSON kind: sizes that are not positive whole numbers, and strings
    where the architecture's default is a number or true/false (transformers 4 would take them silently)."""
    for key, kind, expected in (("model_type", str, "a string"), ("auto_map", dict, "a JSON object")):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise field_error(where, prefix + key, data[key], expected, fix=CONFIG_FIX)
    for key in SIZE_KEYS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise field_error(where, prefix + key, value, "a whole number of at least 1", fix=CONFIG_FIX)
    defaults = _defaults(data["model_type"]) if isinstance(data.get("model_type"), str) else {}
    for key, value in data.items():
        default = defaults.get(key)
        if isinstance(value, str) and isinstance(default, (int, float)):
            expected = "true or false" if isinstance(default, bool) else "a number"
            raise field_error(where, prefix + key, value, expected, fix=CONFIG_FIX)
    for key in ("text_config",):  # multimodal configs nest the language model's sizes
        if isinstance(data.get(key), dict):
            check_config_fields(data[key], where, prefix=f"{prefix}{key}.")


# ---------------------------------------------------------------------------------- checkpoint vs skeleton


def checkpoint_key_map(model: nn.Module, checkpoint_keys: list[str]) -> dict[str, str]:
    """Map checkpoint tensor names to model names (handles a missing or extra base-model prefix)."""
    own = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "")
    mapping = {}
    for key in checkpoint_keys:
        if key in own:
            mapping[key] = key
        elif prefix and f"{prefix}.{key}" in own:
            mapping[key] = f"{prefix}.{key}"
        elif prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in own:
            mapping[key] = key[len(prefix) + 1 :]
    return mapping


def _ignored_unexpected(model: nn.Module) -> re.Pattern | None:
    """transformers' own rule for checkpoint tensors a model no longer has (legacy masks, per-layer rotary
    tables, persistent position ids): the models' `_keys_to_ignore_on_load_unexpected` plus two general ones."""
    patterns: set[str] = set()
    for module in model.modules():
        patterns.update(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None


def _more(names: list[str]) -> str:
    if len(names) <= 1:
        return ""
    shown = ", ".join(names[1 : 1 + SHOWN_NAMES])
    return f" (and {len(names) - 1} more: {shown}{', ...' if len(names) > 1 + SHOWN_NAMES else ''})"


def check_checkpoint(model: nn.Module, shards: list[SafetensorsFile], model_dir: Path) -> list[dict[str, str]]:
    """Compare every checkpoint tensor (headers only) with the skeleton; return, per shard, the checkpoint key ->
    model name map of the tensors to load.

    Refuses, in this order: a tensor in two shards, a tensor whose shape or dtype kind differs from its place
    in the model, a tensor the model has no place for, a parameter no shard holds (tied ones count once).
    """
    expected = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters(remove_duplicate=False)}
    expected.update({name: (tuple(b.shape), b.dtype) for name, b in model.named_buffers() if b is not None})
    ignored = _ignored_unexpected(model)
    shapes, dtypes, unexpected = [], [], []  # (checkpoint key, description) each
    found: set[str] = set()
    owner: dict[str, Path] = {}
    maps: list[dict[str, str]] = []
    for shard in shards:
        key_map = checkpoint_key_map(model, shard.keys())
        where = shard.path.name
        for key in shard.keys():
            if key in owner:
                raise ModelLoadError(
                    f"tensor {key} is in both {owner[key].name} and {where} in {model_dir}; "
                    "the checkpoint is inconsistent, re-save or re-download it."
                )
            owner[key] = shard.path
            name = key_map.get(key)
            if name is None:
                if ignored is None or ignored.search(key) is None:
                    unexpected.append((key, f"{key} in {where} has no place in the model config.json describes"))
                continue
            found.add(name)
            want_shape, want_dtype = expected[name]
            shape, dtype = shard.shape(key), shard.dtype(key)
            if shape != want_shape:
                shapes.append(
                    (key, f"{key} in {where} has shape {list(shape)} but config.json describes {list(want_shape)}")
                )
            elif dtype.is_floating_point != want_dtype.is_floating_point:
                kind = "floating-point" if want_dtype.is_floating_point else f"integer ({want_dtype})"
                dtypes.append(
                    (key, f"{key} in {where} is {shard.entries[key]['dtype']} where the model has a {kind} tensor")
                )
        maps.append(key_map)
    config_fix = (
        f"the config.json in {model_dir} does not match its weights, so fix it or use the weights that came with it"
    )
    weights_fix = f"the weights in {model_dir} are not a checkpoint of this model, re-save or re-download them"
    for problems, fix in ((shapes, config_fix), (dtypes, weights_fix), (unexpected, config_fix)):
        if problems:
            raise ModelLoadError(f"{problems[0][1]}{_more([key for key, _ in problems])}; {fix}.")
    missing = _missing_parameters(model, found)
    if missing:
        raise ModelLoadError(
            f"the checkpoint in {model_dir} has no tensor for {missing[0]} ({len(missing)} missing in all); "
            "the weights do not belong to this config.json."
        )
    return maps


def _missing_parameters(model: nn.Module, found: set[str]) -> list[str]:
    """Parameters no checkpoint tensor fills; a group of tied parameters is filled by any one of its names."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names[0] for names in groups.values() if not any(n in found for n in names)]


# --------------------------------------------------------------------------------------- tokenizer files

TOKENIZER_FIX = "fix or re-download the tokenizer files"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
TOKENIZER_BOOL_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "clean_up_tokenization_spaces", "legacy")


def _token_ok(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))


def check_tokenizer_files(model_dir: Path) -> None:
    """Refuse tokenizer JSON files whose top level or a field transformers reads has the wrong JSON kind (some
    would be taken silently and fail at the first chat template or length check, others with a bare traceback)."""

    def bad(path: Path, key: str, value: Any, expected: str) -> DataError:
        return field_error(path, key, value, expected, DataError, TOKENIZER_FIX)

    for name in ("tokenizer.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json", "vocab.json"):
        path = model_dir / name
        if path.is_file():
            data = read_json_object(path, f"a tokenizer's {name}", DataError, TOKENIZER_FIX)
            if name == "tokenizer.json" and not isinstance(data.get("model"), dict):
                raise bad(path, "model", data.get("model"), "a JSON object (the tokenizer model)")
            if name == "chat_template.json" and not isinstance(data.get("chat_template"), str):
                raise bad(path, "chat_template", data.get("chat_template"), "a string")
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        data = read_json_object(path, "a tokenizer config", DataError, TOKENIZER_FIX)
        _check_tokenizer_config(data, path, bad)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            jinja.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{jinja} is not UTF-8 text ({exc.reason} at byte {exc.start}); {TOKENIZER_FIX}.") from None


def _check_tokenizer_config(data: dict, path: Path, bad) -> None:
    template = data.get("chat_template")
    if template is not None and not isinstance(template, str):
        named = isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template
        )
        if not named:
            raise bad(path, "chat_template", template, 'a string, or a list of {"name": ..., "template": ...} objects')
    length = data.get("model_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float))):
        raise bad(path, "model_max_length", length, "a number")
    for key in SPECIAL_TOKEN_KEYS:
        if data.get(key) is not None and not _token_ok(data[key]):
            raise bad(path, key, data[key], 'a string or an object with a "content" string')
    for key in TOKENIZER_BOOL_KEYS:
        if data.get(key) is not None and not isinstance(data[key], bool):
            raise bad(path, key, data[key], "true or false")
    for key in ("tokenizer_class", "padding_side", "truncation_side"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise bad(path, key, data[key], "a string")
    extra = data.get("additional_special_tokens")
    if extra is not None and not (isinstance(extra, list) and all(_token_ok(t) for t in extra)):
        raise bad(path, "additional_special_tokens", extra, "a list of strings")
    decoder = data.get("added_tokens_decoder")
    if decoder is not None and not (isinstance(decoder, dict) and all(_token_ok(t) for t in decoder.values())):
        raise bad(path, "added_tokens_decoder", decoder, 'an object of {"content": ...} token objects')
