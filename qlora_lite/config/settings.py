"""Run settings as dataclasses: quantization, LoRA, data and training; YAML loading; validation.

Every field carries a one-line help text in its metadata, which `qlora-lite train --help` prints.
Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..errors import ConfigError


def _setting(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class QuantConfig:
    bits: int = _setting(4, "4 (NF4/FP4 via bitsandbytes) or 8 (LLM.int8)")
    quant_type: str = _setting("nf4", "4-bit data type: nf4 or fp4")
    double_quant: bool = _setting(True, "quantize the 4-bit absmax statistics again (saves ~0.37 bit/param)")
    blocksize: int = _setting(64, "4-bit quantization block size")
    int8_threshold: float = _setting(6.0, "LLM.int8 outlier threshold on activations (0 turns the fp16 outlier path off)")

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quant.bits is {self.bits}, but only 4 and 8 are supported; set quant.bits to 4 or 8.")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quant.quant_type is {self.quant_type!r}; use 'nf4' or 'fp4'.")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"quant.blocksize is {self.blocksize}; use a power of two from 64 to 4096.")
        if self.int8_threshold < 0:
            raise ConfigError(f"quant.int8_threshold is {self.int8_threshold}; it must be 0 or positive.")


@dataclass
class LoraConfig:
    r: int = _setting(16, "adapter rank")
    alpha: float = _setting(32.0, "scaling numerator: scaling = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = _setting(0.0, "dropout on the adapter input")
    target_modules: Union[str, list] = _setting(
        "all-linear", "'all-linear', a list of module names (e.g. [q_proj, v_proj]) or a regex over full module paths"
    )
    rslora: bool = _setting(False, "rank-stabilised scaling alpha / sqrt(r)")
    adapter_dtype: str = _setting(
        "bfloat16", "dtype A and B are stored in: bfloat16 (the optimizer keeps fp32 masters) or float32"
    )

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora.r is {self.r}; the rank must be a positive integer such as 8 or 16.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout is {self.dropout}; it must be in [0, 1).")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules is an empty list; name at least one module or use 'all-linear'.")
        if self.adapter_dtype not in ("bfloat16", "float32"):
            raise ConfigError(f"lora.adapter_dtype is {self.adapter_dtype!r}; use 'bfloat16' or 'float32'.")


@dataclass
class DataConfig:
    train: str = _setting(
        "", "training data: a .jsonl / .json file (text, prompt/completion or messages records), or a datasets name 'org/name[:split]'"
    )
    eval: str = _setting("", "evaluation data file; empty to split eval_fraction off the training data")
    eval_fraction: float = _setting(0.0, "fraction of the training records held out for eval when data.eval is empty")
    max_seq_len: int = _setting(1024, "tokens per sequence; longer records are truncated (see truncation)")
    truncation: bool = _setting(True, "truncate records longer than max_seq_len (false: refuse them)")
    packing: bool = _setting(False, "pack several records into each max_seq_len sequence")

    def validate(self) -> None:
        if self.max_seq_len <= 0:
            raise ConfigError(f"data.max_seq_len is {self.max_seq_len}; it must be a positive number of tokens.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction is {self.eval_fraction}; it must be in [0, 1).")


@dataclass
class TrainSettings:
    max_steps: int = _setting(200, "optimizer steps to run")
    micro_batch_size: int = _setting(4, "sequences per forward pass")
    grad_accum: int = _setting(4, "micro-batches per optimizer step")
    lr: float = _setting(2.0e-4, "peak learning rate")
    weight_decay: float = _setting(0.0, "AdamW weight decay on the adapters")
    warmup_steps: int = _setting(10, "linear warmup steps")
    schedule: str = _setting("cosine", "learning-rate schedule after warmup: cosine or constant")
    optimizer: str = _setting("paged_adamw_8bit", "paged_adamw_8bit (falls back to adamw_8bit off CUDA), adamw_8bit or adamw")
    max_grad_norm: float = _setting(1.0, "gradient-norm clipping (0 turns it off)")
    gradient_checkpointing: bool = _setting(True, "recompute each decoder layer in backward instead of storing activations")
    offload_activations: bool = _setting(False, "keep each checkpointed layer's input in CPU memory (long sequences on small GPUs)")
    loss_chunk_tokens: int = _setting(128, "tokens per chunk of lm_head + cross-entropy, so full-vocabulary logits never exist (0: unchunked)")
    seed: int = _setting(0, "seed for data order, dropout and adapter init")
    log_every: int = _setting(10, "steps between metrics.jsonl lines")
    eval_every: int = _setting(50, "steps between eval passes (0: only at the end)")
    save_every: int = _setting(50, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _setting(2, "how many of the newest checkpoints to keep")
    bf16: bool = _setting(True, "run the forward under bf16 autocast where the device has it (CUDA with bf16, the CPU)")

    def validate(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} is {getattr(self, name)}; it must be a positive integer.")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ConfigError("train.offload_activations needs train.gradient_checkpointing: true (it offloads the checkpointed inputs).")
        for name in ("warmup_steps", "eval_every", "save_every", "loss_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} is {getattr(self, name)}; it must be 0 or positive.")
        if self.lr <= 0:
            raise ConfigError(f"train.lr is {self.lr}; it must be a positive number such as 2e-4.")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule is {self.schedule!r}; use 'cosine' or 'constant'.")
        if self.optimizer not in ("paged_adamw_8bit", "adamw_8bit", "adamw"):
            raise ConfigError(f"train.optimizer is {self.optimizer!r}; use paged_adamw_8bit, adamw_8bit or adamw.")


@dataclass
class TrainConfig:
    model: str = _setting("", "model directory: config.json + *.safetensors + tokenizer files")
    output_dir: str = _setting("runs/run", "run directory for adapter/, checkpoints/, metrics.jsonl")
    trust_remote_code: bool = _setting(False, "allow model code from the model directory (off unless you trust it)")
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model is not set; give the path of a Hugging Face model directory.")
        if not self.data.train:
            raise ConfigError("data.train is not set; give the path of a JSONL training file.")
        for section in (self.quant, self.lora, self.data, self.train):
            section.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"quant": QuantConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainSettings}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the field type, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if tp is list or origin is list:
        if isinstance(value, str):
            if value.startswith("["):
                import yaml

                value = yaml.safe_load(value)
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


def valid_keys() -> list[str]:
    """All settable keys in dotted form, e.g. `lora.r`."""
    keys = []
    for name, tp in _field_types(TrainConfig).items():
        if _is_section(tp):
            keys.extend(f"{name}.{sub}" for sub in _field_types(tp))
        else:
            keys.append(name)
    return keys


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        if not prefix:
            raise ConfigError(f"the config must be a mapping of keys to values, got {data!r}; write `key: value` lines.")
        section = prefix.rstrip(".")
        raise ConfigError(
            f"config section {section!r} must be a mapping of keys to values, got {data!r}; "
            f"write it as indented `key: value` lines under `{section}:`."
        )
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types_:
            choices = ", ".join(f"{prefix}{k}" for k in types_)
            raise ConfigError(f"unknown config key {full!r}; valid keys here are: {choices}.")
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
            raise ConfigError(f"unknown config key {dotted!r}; valid keys are: {', '.join(sorted(keys))}.")
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


def load_config(path: str | Path, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Read a YAML training config, apply dotted overrides, validate, and return it.

    Relative `model`, `data.train` and `data.eval` paths are taken relative to the YAML file's folder
    when they exist there, so a config travels with its data.
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
        raise ConfigError(f"config file {path} line {line} is not UTF-8 text ({exc.reason}); save the file as UTF-8.") from None
    try:
        data = yaml.safe_load(text)
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
    for holder, name in ((config, "model"), (config.data, "train"), (config.data, "eval")):
        value = getattr(holder, name)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            setattr(holder, name, str(base / value))
    config.validate()
    return config


def field_help() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every setting, for `--help` output."""
    rows = []
    for f in dataclasses.fields(TrainConfig):
        tp = _field_types(TrainConfig)[f.name]
        if _is_section(tp):
            for sub in dataclasses.fields(tp):
                default = sub.default_factory() if sub.default is dataclasses.MISSING else sub.default
                rows.append((f"{f.name}.{sub.name}", repr(default), sub.metadata.get("help", "")))
        else:
            rows.append((f.name, repr(f.default), f.metadata.get("help", "")))
    return rows
