"""The one settings schema: every run setting defined once, with its type, default, help, valid range and
whether a resumed run must keep it.

`qlora-lite train` (YAML + `--section.key` overrides), `qlora-lite memory`, the out-of-memory advice, the
examples and the tools all read these dataclasses. Each field's metadata holds:

- `help`: the one-line text `qlora-lite train --help` prints;
- `choices`, `min`, `max` (inclusive), `min_exclusive`: what `validate` checks, besides the type;
- `resume`: a checkpoint records this key, and `--resume` refuses a config that changes it.

Cross-field rules (offload needs checkpointing, ...) live in each section's `check`. `validate` collects
every problem and raises one `ConfigError` naming them all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw")
SCHEDULES = ("cosine", "constant")
ADAPTER_DTYPES = ("bfloat16", "float32")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# Far beyond any real run, small enough that torch and the OS accept the numbers derived from them.
MAX_COUNT = 2**31 - 1
# train settings selective recompute (train.checkpoint_every > 1) does not run with yet
SELECTIVE_RECOMPUTE_CLASHES = ("offload_activations", "tiled_mlp", "fsdp")


def setting(default: Any, help: str, *, resume: bool = False, **rules: Any) -> Any:
    """A dataclass field carrying its help text, validation rules and resume flag in its metadata."""
    meta = {"help": help, "resume": resume, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _range_text(meta: Any, value: Any) -> str:
    """What a number must be, in words, from a field's rules."""
    if meta.get("expect"):
        return meta["expect"]
    low, high, above = meta.get("min"), meta.get("max"), meta.get("min_exclusive")
    limit = f" (at most {high})" if high is not None else ""
    if above == 0:
        return "a positive number" + limit
    if low == 1 and isinstance(value, int):
        return "a positive whole number" + limit
    if low == 0:
        return "0 or more" + limit
    return " and ".join(
        text for text, bound in ((f"at least {low}", low), (f"at most {high}", high)) if bound is not None
    )


def _check_field(f: dataclasses.Field, value: Any, key: str) -> str | None:
    """The problem with one value against its field's rules, or None."""
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} is {value}; it must be a finite number"
    if "choices" in meta and value not in meta["choices"]:
        names = [str(c) for c in meta["choices"]]
        return f"{key} is {value!r}; use {', '.join(names[:-1])} or {names[-1]}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high, above = meta.get("min"), meta.get("max"), meta.get("min_exclusive")
        if (
            (above is not None and value <= above)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            return f"{key} is {value}; it must be {_range_text(meta, value)}"
    return None


class Section:
    """Validation shared by the setting sections: field rules first, then the section's own `check`."""

    def problems(self, prefix: str) -> list[str]:
        """Every problem with this section's values, each naming its dotted key."""
        found = []
        for f in dataclasses.fields(self):
            problem = _check_field(f, getattr(self, f.name), f"{prefix}{f.name}")
            if problem:
                found.append(problem)
        return found or self.check(prefix)

    def check(self, prefix: str) -> list[str]:
        """Rules across fields; sections override it."""
        return []

    def validate(self, prefix: str | None = None) -> None:
        """Raise `ConfigError` naming every problem with this section."""
        problems = self.problems(prefix if prefix is not None else f"{SECTION_NAMES.get(type(self), '')}.")
        if problems:
            raise ConfigError("; ".join(problems) + ".")


@dataclass
class QuantConfig(Section):
    bits: int = setting(4, "4 (NF4/FP4 via bitsandbytes) or 8 (LLM.int8)", choices=(4, 8), resume=True)
    quant_type: str = setting("nf4", "4-bit data type: nf4 or fp4", choices=("nf4", "fp4"), resume=True)
    double_quant: bool = setting(
        True, "quantize the 4-bit absmax statistics again (saves ~0.37 bit/param)", resume=True
    )
    blocksize: int = setting(64, "4-bit quantization block size", choices=BLOCKSIZES, resume=True)
    int8_threshold: float = setting(
        6.0, "LLM.int8 outlier threshold on activations (0 turns the fp16 outlier path off)", min=0.0, resume=True
    )


@dataclass
class LoraConfig(Section):
    r: int = setting(16, "adapter rank", min=1, expect="a positive whole number such as 8 or 16", resume=True)
    alpha: float = setting(32.0, "scaling numerator: scaling = alpha / r (alpha / sqrt(r) with rslora)", resume=True)
    dropout: float = setting(0.0, "dropout on the adapter input", min=0.0, max=0.999, expect="in [0, 1)", resume=True)
    target_modules: str | list = setting(
        "all-linear",
        "'all-linear', a list of module names (e.g. [q_proj, v_proj]) or a regex over full module paths",
        resume=True,
    )
    rslora: bool = setting(False, "rank-stabilised scaling alpha / sqrt(r)", resume=True)
    use_dora: bool = setting(
        False, "DoRA (peft's use_dora): a trained magnitude per output row scales W + scaling·B·A", resume=True
    )
    modules_to_save: list = setting(
        [], "modules trained whole and saved as peft does (e.g. [embed_tokens, lm_head] for new tokens)", resume=True
    )
    adapter_dtype: str = setting(
        "bfloat16",
        "dtype A and B are stored in: bfloat16 (the optimizer keeps fp32 masters) or float32",
        choices=ADAPTER_DTYPES,
        resume=True,
    )

    def check(self, prefix: str) -> list[str]:
        found = []
        if isinstance(self.target_modules, list) and not self.target_modules:
            found.append(f"{prefix}target_modules is an empty list; name at least one module or use 'all-linear'")
        if self.alpha == 0:
            found.append(f"{prefix}alpha is 0, so the adapter could never change the output; use e.g. 2 * r")
        return found


@dataclass
class DataConfig(Section):
    train: str | list = setting(
        "",
        "training data: a .jsonl / .json file or a hub dataset 'org/name[:split]' (text, prompt/completion, messages, "
        "alpaca or ShareGPT records), or a list of sources {path, weight, format, columns}",
        resume=True,
    )
    eval: str | list = setting(
        "", "evaluation data, as data.train; empty to split eval_fraction off the training data", resume=True
    )
    eval_fraction: float = setting(
        0.0,
        "fraction of the training records held out for eval when data.eval is empty",
        min=0.0,
        max=0.99,
        expect="in [0, 1)",
        resume=True,
    )
    max_seq_len: int = setting(
        1024,
        "tokens per sequence; longer records are truncated (see truncation)",
        min=1,
        max=2**24,
        expect="a positive number of tokens (at most 16777216)",
        resume=True,
    )
    truncation: bool = setting(True, "truncate records longer than max_seq_len (false: refuse them)", resume=True)
    packing: bool = setting(False, "pack several records into each max_seq_len sequence", resume=True)
    chat_template: str = setting(
        "",
        "chat template for messages records: a Jinja file, or a known name: chatml, llama3, fallback; "
        "empty: the tokenizer's own, else a plain fallback",
        resume=True,
    )
    add_special_tokens: list = setting(
        [],
        "tokens added to the tokenizer as special tokens (e.g. ['<|im_start|>', '<|im_end|>']); needs resize_embeddings",
        resume=True,
    )
    resize_embeddings: bool = setting(
        False,
        "grow the model's embeddings (and lm_head) to the tokenizer's size; new rows start as the mean row",
        resume=True,
    )
    system_prompt: str = setting(
        "", "system turn put first in messages records that have none (empty: none)", resume=True
    )


@dataclass
class TrainSettings(Section):
    max_steps: int = setting(0, "optimizer steps to run (set this or train.epochs)", min=0, max=MAX_COUNT)
    epochs: float = setting(
        0.0, "passes over the training data, as an alternative to max_steps (may be fractional)", min=0.0, max=1e6
    )
    micro_batch_size: int = setting(4, "sequences per forward pass", min=1, max=65536, resume=True)
    grad_accum: int = setting(4, "micro-batches per optimizer step", min=1, max=65536, resume=True)
    lr: float = setting(
        2.0e-4, "peak learning rate", min_exclusive=0.0, max=10.0, expect="a positive number such as 2e-4"
    )
    weight_decay: float = setting(0.0, "AdamW weight decay on the adapters", min=0.0, max=10.0)
    warmup_steps: int = setting(10, "linear warmup steps", min=0, max=MAX_COUNT)
    schedule: str = setting("cosine", "learning-rate schedule after warmup: cosine or constant", choices=SCHEDULES)
    optimizer: str = setting(
        "paged_adamw_8bit",
        "paged_adamw_8bit (falls back to adamw_8bit off CUDA), adamw_8bit or adamw",
        choices=OPTIMIZERS,
        resume=True,
    )
    max_grad_norm: float = setting(1.0, "gradient-norm clipping (0 turns it off)", min=0.0)
    gradient_checkpointing: bool = setting(
        True, "recompute each decoder layer in backward instead of storing activations"
    )
    checkpoint_every: int = setting(
        1,
        "with gradient_checkpointing, recompute only layers 0, k, 2k, ... and keep the others' activations: "
        "fewer recomputed layers, faster steps, more memory (1: every layer)",
        min=1,
        max=MAX_COUNT,
    )
    offload_activations: bool = setting(
        False, "keep each checkpointed layer's input in CPU memory (long sequences on small GPUs)"
    )
    tiled_mlp: bool = setting(
        False,
        "run each layer's feed-forward norm + MLP over tiles of the sequence in forward and backward, so its "
        "intermediates exist for one tile at a time (long sequences; same values, ~5% slower)",
    )
    compile: bool = setting(
        False, "torch.compile each decoder layer (regional: compiled once, reused by every layer); costs compile time"
    )
    loss_chunk_tokens: int = setting(
        128,
        "tokens per chunk of lm_head + cross-entropy, so full-vocabulary logits never exist (0: unchunked)",
        min=0,
        max=2**24,
    )
    seed: int = setting(0, "seed for data order, dropout and adapter init", min=0, max=2**63 - 1, resume=True)
    log_every: int = setting(10, "steps between metrics.jsonl lines", min=1, max=MAX_COUNT)
    eval_every: int = setting(50, "steps between eval passes (0: only at the end)", min=0, max=MAX_COUNT)
    save_every: int = setting(50, "steps between checkpoints (0: only at the end)", min=0, max=MAX_COUNT)
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep", min=1, max=MAX_COUNT)
    bf16: bool = setting(True, "run the forward under bf16 autocast where the device has it (CUDA with bf16, the CPU)")
    report_to: list = setting(
        [], "experiment trackers besides metrics.jsonl: any of tensorboard, wandb, csv (e.g. [tensorboard, csv])"
    )
    fsdp: bool = setting(
        False,
        "under torchrun, shard the 4-bit base and the adapters over the GPUs of a node (FSDP2; replicated across "
        "nodes); off: every rank holds the whole model (data parallel)",
        resume=True,
    )
    collective_timeout: float = setting(
        600.0,
        "seconds a rank of a torchrun launch waits for the others before the run stops with a message",
        min_exclusive=0.0,
        max=86400.0,
    )

    def check(self, prefix: str) -> list[str]:
        if self.offload_activations and not self.gradient_checkpointing:
            return [
                f"{prefix}offload_activations needs {prefix}gradient_checkpointing: true "
                "(it offloads the checkpointed inputs)"
            ]
        every = self.checkpoint_every
        if isinstance(every, int) and not isinstance(every, bool) and every > 1:
            if not self.gradient_checkpointing:
                return [
                    f"{prefix}checkpoint_every is {every} but {prefix}gradient_checkpointing is off; "
                    "turn it on, or set checkpoint_every: 1"
                ]
            clashes = [n for n in SELECTIVE_RECOMPUTE_CLASHES if getattr(self, n) is True]
            if clashes:
                return [
                    f"{prefix}checkpoint_every: {every} (selective recompute) does not run with "
                    f"{' or '.join(prefix + n for n in clashes)} yet; set checkpoint_every: 1, or turn those off"
                ]
        return []


@dataclass
class TrainConfig:
    model: str = setting("", "model directory: config.json + *.safetensors + tokenizer files", resume=True)
    output_dir: str = setting("runs/run", "run directory for adapter/, checkpoints/, metrics.jsonl")
    revision: str = setting("", "hub revision (branch, tag or commit) when model is a hub id; empty: main", resume=True)
    trust_remote_code: bool = setting(False, "allow model code from the model directory (off unless you trust it)")
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)

    def problems(self, for_training: bool = True) -> list[str]:
        """Every problem with the config; `for_training=False` (the memory report) does not need data."""
        found = []
        if not self.model:
            found.append("model is not set; give the path of a Hugging Face model directory")
        if for_training and not self.data.train:
            found.append("data.train is not set; give the path of a JSONL training file")
        if for_training and (self.train.max_steps > 0) == (self.train.epochs > 0):
            found.append(
                "set exactly one of train.max_steps (optimizer steps) and train.epochs (passes over the data)"
                + (f", not both ({self.train.max_steps} and {self.train.epochs})" if self.train.max_steps else "")
            )
        if self.train.fsdp is True and self.quant.bits == 8:
            found.append(
                "train.fsdp shards 4-bit bases only (bitsandbytes' 8-bit layers cannot be sharded); set quant.bits: 4, "
                "or train.fsdp: false to replicate the 8-bit base on every rank"
            )
        if self.train.fsdp is True and self.lora.use_dora is True:
            found.append(
                "lora.use_dora does not run under train.fsdp yet (its magnitudes start from the whole base weights); "
                "turn one of them off"
            )
        t = self.train
        clash = [
            k
            for k, on in (
                ("train.tiled_mlp", t.tiled_mlp),
                ("train.offload_activations", t.offload_activations),
                ("train.fsdp", t.fsdp),
            )
            if on is True
        ]
        if t.compile is True and clash:
            found.append(
                f"train.compile cannot be combined with {' or '.join(clash)} yet (each stops torch.compile from "
                "compiling the layers); turn one of them off"
            )
        if self.train.fsdp is True and self.train.tiled_mlp is True:
            found.append("train.tiled_mlp does not run under train.fsdp yet; turn one of them off")
        whole = [k for k in ("lora.modules_to_save", "data.add_special_tokens") if self.get(k)]
        if self.train.fsdp is True and whole:
            found.append(
                f"train.fsdp does not shard modules trained whole or new token rows ({' and '.join(whole)} set); set "
                "train.fsdp: false to train them data parallel"
            )
        for name in SECTIONS:
            found.extend(getattr(self, name).problems(f"{name}."))
        return found

    def validate(self, for_training: bool = True) -> None:
        """Raise `ConfigError` naming every problem (all of them, not only the first)."""
        problems = self.problems(for_training)
        if problems:
            raise ConfigError("; ".join(problems) + ".")

    def to_dict(self) -> dict:
        """Nested plain dicts, as written to a run's config.yaml."""
        return dataclasses.asdict(self)

    def get(self, dotted: str) -> Any:
        """The value of a dotted key such as `lora.r`."""
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node


SECTIONS: dict[str, type] = {"quant": QuantConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainSettings}
SECTION_NAMES = {cls: name for name, cls in SECTIONS.items()}


def schema_fields() -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, dataclass field) for every setting, in declaration order."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            out.extend((f"{f.name}.{sub.name}", sub) for sub in dataclasses.fields(SECTIONS[f.name]))
        else:
            out.append((f.name, f))
    return out


def valid_keys() -> list[str]:
    """All settable keys in dotted form, e.g. `lora.r`."""
    return [key for key, _ in schema_fields()]


def default_of(dotted: str) -> Any:
    """The schema's default for a dotted key."""
    return TrainConfig().get(dotted)


def resume_keys() -> list[str]:
    """The dotted keys a resumed run must keep (a checkpoint records them as its settings fingerprint)."""
    return [key for key, f in schema_fields() if f.metadata.get("resume")]


def check_value(dotted: str, value: Any) -> str | None:
    """The problem with `value` for the setting `dotted` (its rules, not its type), or None."""
    fields = dict(schema_fields())
    return _check_field(fields[dotted], value, dotted)


def field_help() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every setting, for `--help` output."""
    return [(key, repr(default_of(key)), f.metadata.get("help", "")) for key, f in schema_fields()]
