"""Reading settings: YAML files, `--section.key value` overrides, type coercion; validated against the schema.

Unknown keys get the closest valid key as a suggestion; wrong types and out-of-range values raise
`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

from ..errors import ConfigError
from .settings import TrainConfig, valid_keys

# A comma-separated list of names, as typed on a command line: q_proj,v_proj
WORD = re.compile(r"\s*[A-Za-z_][\w.-]*\s*")
LIST_TEXT = re.compile(r"\s*[A-Za-z_][\w.]*\s*(,\s*[A-Za-z_][\w.]*\s*)+,?\s*")


def _looks_like_list(text: str) -> bool:
    return text.strip().startswith("[") or bool(LIST_TEXT.fullmatch(text))


def unknown_key_error(key: str, choices: list[str]) -> ConfigError:
    """`ConfigError` for an unknown key: the closest valid key first, then the valid keys."""
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    if not close:  # a key in the wrong section: same leaf name elsewhere
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in choices if c.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys are: {', '.join(choices)}.")


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the field type, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = list(typing.get_args(tp))
        if list in options and isinstance(value, str) and _looks_like_list(value):
            options.remove(list)
            options.insert(0, list)  # "[q_proj, v_proj]" and "q_proj,v_proj" are lists, not regexes
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if tp is list or origin is list:
        if isinstance(value, str):
            if value.strip().startswith("["):
                import yaml

                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    raise ConfigError(f"{key} got {value!r}; expected a list such as [q_proj, v_proj].") from None
            elif LIST_TEXT.fullmatch(value):
                value = [part.strip() for part in value.split(",") if part.strip()]
            elif tp is list and WORD.fullmatch(value):
                value = [value.strip()]  # one name where a list of names is expected: report_to: csv
            elif tp is list and not value.strip():
                value = []
            else:
                raise ConfigError(f"{key} got {value!r}; expected a list such as [q_proj, v_proj].")
        if not isinstance(value, list):
            raise ConfigError(f"{key} got {value!r}; expected a list.")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key} got {value!r}; expected true or false.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} got {value!r}; expected a whole number.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} got {value!r}; expected a whole number.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} got {value!r}; expected a number.")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(f"{key} got {value!r}; expected a finite number such as 2e-4.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} got {value!r}; expected a string.")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        if not prefix:
            raise ConfigError(
                f"the config must be a mapping of keys to values, got {data!r}; write `key: value` lines."
            )
        section = prefix.rstrip(".")
        raise ConfigError(
            f"config section {section!r} must be a mapping of keys to values, got {data!r}; "
            f"write it as indented `key: value` lines under `{section}:`."
        )
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in types_:
            raise unknown_key_error(str(full), [f"{prefix}{k}" for k in types_])
        tp = types_[key]
        if _is_section(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def config_from_dict(data: dict) -> TrainConfig:
    """Build a `TrainConfig` from nested dicts, refusing unknown keys and wrong types (not yet validated)."""
    return _build(TrainConfig, data, "")


def apply_overrides(data: dict, overrides: dict[str, str]) -> dict:
    """Return a copy of `data` with dotted keys (`lora.r`) set from command-line strings."""
    keys = set(valid_keys())
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for dotted, value in overrides.items():
        if dotted not in keys:
            raise unknown_key_error(dotted, valid_keys())
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"config section {part!r} must be a mapping of keys to values, got {node!r}; "
                    f"write it as indented `key: value` lines under `{part}:`."
                )
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: dict[str, str] | None = None, for_training: bool = True) -> TrainConfig:
    """Read a YAML training config, apply dotted overrides, validate, and return it.

    Relative `model`, `data.train` and `data.eval` paths (each source's, for a list) are taken relative to the
    YAML file's folder when they exist there, so a config travels with its data. `for_training=False` (the memory report)
    accepts a config without training data.
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory; give the path of a YAML training config file.")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; give the path of a YAML training config.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} line {line} is not UTF-8 text ({exc.reason}); save the file as UTF-8."
        ) from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}{where} is not valid YAML ({problem}); fix its syntax.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} holds a YAML {type(data).__name__}, not a mapping of settings; "
            "write `key: value` lines such as `model: path/to/model` (see examples/qlora_instruct.yaml)."
        )
    data = apply_overrides(data, overrides or {})
    config = config_from_dict(data)
    base = path.parent

    def beside_yaml(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute() and not Path(value).exists():
            return str(base / value) if (base / value).exists() else value
        return value

    for holder, name in (
        (config, "model"),
        (config.data, "train"),
        (config.data, "eval"),
        (config.data, "chat_template"),
    ):
        value = getattr(holder, name)
        if isinstance(value, list):  # several data sources: a path, or a mapping with a `path`
            value = [
                {**item, "path": beside_yaml(item["path"])} if isinstance(item, dict) and "path" in item else item
                for item in value
            ]
            value = [beside_yaml(item) for item in value]
        setattr(holder, name, beside_yaml(value))
    config.validate(for_training)
    return config


def config_with_overrides(overrides: dict[str, str] | None = None, for_training: bool = True) -> TrainConfig:
    """The schema's defaults with dotted overrides applied, validated (no YAML file)."""
    config = config_from_dict(apply_overrides({}, overrides or {}))
    config.validate(for_training)
    return config


def _unique_key_loader() -> type:
    """A safe YAML loader that refuses a key written twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader
