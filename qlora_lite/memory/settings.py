"""The run settings a memory estimate depends on, taken from the one settings schema.

`RunSettings` mirrors the training config's keys that change memory (`SCHEMA_KEYS` maps each field to its
dotted config key, and the defaults are the trainer's), plus what only the memory model needs: the device,
the attention implementation and whether micro-batches hold padding. `settings_from_config` is the one way
a training config becomes memory settings: `qlora-lite memory CONFIG.yaml`, the out-of-memory advice and the
examples' pre-flight all call it, so they predict the same number for the same config.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..config.settings import SELECTIVE_RECOMPUTE_CLASHES, TrainConfig, check_value, default_of
from ..errors import ConfigError

MiB = 1 << 20
CUDA_CONTEXT = 500 * MiB  # CUDA 12 context + kernels loaded lazily; typically 300-600 MiB, outside torch's allocator

# RunSettings field -> the training config key it mirrors (name, type, default and rules come from there).
SCHEMA_KEYS = {
    "bits": "quant.bits",
    "quant_type": "quant.quant_type",
    "double_quant": "quant.double_quant",
    "blocksize": "quant.blocksize",
    "rank": "lora.r",
    "targets": "lora.target_modules",
    "lora_dropout": "lora.dropout",
    "use_dora": "lora.use_dora",
    "adapter_dtype": "lora.adapter_dtype",
    "seq_len": "data.max_seq_len",
    "packing": "data.packing",
    "batch_size": "train.micro_batch_size",
    "grad_accum": "train.grad_accum",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "checkpoint_every": "train.checkpoint_every",
    "offload_activations": "train.offload_activations",
    "tiled_mlp": "train.tiled_mlp",
    "optimizer": "train.optimizer",
    "loss_chunk_tokens": "train.loss_chunk_tokens",
    "fsdp": "train.fsdp",
}
# Names the config and peft users reach for, accepted by `estimate_memory` and `make_settings`.
SETTING_ALIASES = {"r": "rank", "target_modules": "targets", "micro_batch_size": "batch_size", "max_seq_len": "seq_len"}
ATTENTION = (None, "sdpa", "eager", "flash_attention_2")


def _default(field_name: str) -> Any:
    return default_of(SCHEMA_KEYS[field_name])


@dataclass(frozen=True)
class RunSettings:
    """The settings one estimate is for; the defaults are `qlora-lite train`'s."""

    bits: int = _default("bits")
    quant_type: str = _default("quant_type")
    double_quant: bool = _default("double_quant")
    blocksize: int = _default("blocksize")
    rank: int = _default("rank")
    targets: Any = _default("targets")
    lora_dropout: float = _default("lora_dropout")
    use_dora: bool = _default("use_dora")  # DoRA: one magnitude vector [out] per adapted layer
    adapter_dtype: str = _default("adapter_dtype")  # float32: A and B (and their gradients) in fp32 under bf16 autocast
    seq_len: int = _default("seq_len")
    packing: bool = _default("packing")
    batch_size: int = _default("batch_size")
    grad_accum: int = _default("grad_accum")  # > 1 keeps fp32 gradients across forwards
    gradient_checkpointing: bool = _default("gradient_checkpointing")
    checkpoint_every: int = _default("checkpoint_every")  # selective recompute: layers 0, k, 2k, ... checkpointed
    offload_activations: bool = _default("offload_activations")
    tiled_mlp: bool = _default("tiled_mlp")
    tile_tokens: int = 0  # sequence positions per tile of the tiled MLP (0: the trainer's choice, the hidden size)
    optimizer: str = _default("optimizer")
    loss_chunk_tokens: int = _default("loss_chunk_tokens")  # 0: transformers' full logits
    chunked_loss: bool | None = None  # None: loss_chunk_tokens > 0; False forces the full-logits path
    attn_implementation: str | None = None  # None: what transformers picks for the config (sdpa, or eager)
    padding: bool | None = None  # None: micro-batches of several unpacked records hold padding
    device: str = "cuda"  # "cuda" or "cpu": which kernels' temporaries, allocator and context apply
    cuda_context_bytes: int = CUDA_CONTEXT
    trainable_token_rows: int = 0  # new tokens' rows trained (data.add_special_tokens with resize_embeddings)
    modules_to_save: tuple[str, ...] = ()  # modules trained whole (lora.modules_to_save)
    fsdp: bool = _default("fsdp")  # under torchrun: shard over the GPUs of a node (memory.ranks), else data parallel
    gpus: int = 1  # ranks of the launch, all nodes together (memory.ranks; the single-GPU report ignores it)
    nodes: int = 1  # nodes the ranks are spread over (FSDP shards within a node only)

    def __post_init__(self) -> None:
        if not isinstance(self.modules_to_save, tuple):
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        if self.chunked_loss is None:
            object.__setattr__(self, "chunked_loss", bool(self.loss_chunk_tokens) and self.loss_chunk_tokens > 0)
        if isinstance(self.targets, tuple):
            object.__setattr__(self, "targets", list(self.targets))

    def problems(self) -> list[str]:
        """Every setting that cannot describe a run, with the schema's rules for the mirrored ones."""
        found = []
        for name, key in SCHEMA_KEYS.items():
            value = getattr(self, name)
            expected = type(_default(name))
            if expected in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                found.append(f"{name} is {value!r}; it must be a number")
                continue
            if expected is int and isinstance(value, float):
                found.append(f"{name} is {value!r}; it must be a whole number")
                continue
            problem = check_value(key, value)
            if problem:
                found.append(problem.replace(key, name, 1))
        if self.chunked_loss and self.loss_chunk_tokens <= 0:
            found.append(f"loss_chunk_tokens is {self.loss_chunk_tokens}; a chunked loss needs a positive chunk")
        if isinstance(self.targets, list) and not self.targets:
            found.append("targets is an empty list; name at least one module (e.g. q_proj,v_proj) or use 'all-linear'")
        if self.attn_implementation not in ATTENTION:
            found.append(f"attn_implementation is {self.attn_implementation!r}; use sdpa, eager or flash_attention_2")
        rows = self.trainable_token_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            found.append(f"trainable_token_rows is {rows!r}; it must be a whole number, 0 or more")
        if self.device not in ("cuda", "cpu"):
            found.append(f"device is {self.device!r}; use 'cuda' or 'cpu'")
        if self.offload_activations and not self.gradient_checkpointing:
            found.append("offload_activations needs gradient_checkpointing (it offloads the checkpointed inputs)")
        every = self.checkpoint_every
        if isinstance(every, int) and not isinstance(every, bool) and every > 1:
            clashes = [n for n in SELECTIVE_RECOMPUTE_CLASHES if getattr(self, n) is True]
            if not self.gradient_checkpointing:
                found.append(f"checkpoint_every is {every}; it needs gradient_checkpointing")
            elif clashes:
                found.append(f"checkpoint_every {every} does not run with {' or '.join(clashes)} yet")
        found.extend(self._rank_problems())
        return found

    def _rank_problems(self) -> list[str]:
        found = []
        for name in ("gpus", "nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                found.append(f"{name} is {value!r}; it must be a whole number, 1 or more")
        if not found and self.gpus % self.nodes:
            found.append(
                f"nodes is {self.nodes}, which does not divide gpus {self.gpus}; gpus counts the GPUs of all nodes "
                f"together, the same number on each (e.g. gpus {2 * self.nodes} with nodes {self.nodes})"
            )
        if self.fsdp is True and (self.modules_to_save or self.trainable_token_rows):
            found.append(
                "fsdp trains LoRA adapters only; drop modules_to_save and trained new-token rows, or turn fsdp off"
            )
        if self.fsdp is True and self.bits == 8:
            found.append(
                "fsdp shards 4-bit bases only (bitsandbytes' 8-bit layers cannot be sharded); use bits 4, or "
                "data parallel (fsdp off) to replicate the 8-bit base on every rank"
            )
        return found

    def validate(self) -> None:
        """Raise `ConfigError` naming every setting that cannot describe a run."""
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems) + ".")

    @property
    def padded(self) -> bool:
        """Whether micro-batches hold padding (a [b, 1, s, s] mask, so SDPA cannot use its flash kernel)."""
        return self.padding if self.padding is not None else self.batch_size > 1 and not self.packing

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return self.batch_size * self.seq_len

    @property
    def optimizer_in_use(self) -> str:
        """Paged optimizers exist only on CUDA; `AdapterOptimizer` falls back to adamw_8bit elsewhere."""
        return "adamw_8bit" if self.optimizer == "paged_adamw_8bit" and self.device != "cuda" else self.optimizer


SETTING_NAMES = tuple(f.name for f in fields(RunSettings))


def make_settings(**run_settings: Any) -> RunSettings:
    """`RunSettings` from keyword arguments (aliases r, target_modules, micro_batch_size, max_seq_len accepted)."""
    kwargs = {}
    for key, value in run_settings.items():
        name = SETTING_ALIASES.get(key, key)
        if name not in SETTING_NAMES:
            raise ConfigError(f"unknown memory setting {key!r}; valid settings are: {', '.join(SETTING_NAMES)}.")
        kwargs[name] = value
    settings = RunSettings(**kwargs)
    settings.validate()
    return settings


def settings_from_config(config: TrainConfig, device: str = "cuda", **extra: Any) -> RunSettings:
    """The memory settings of a training config (on `device`), plus memory-only `extra` settings.

    `trainable_token_rows` is the number of added special tokens when the embeddings are resized to train them."""
    values = {name: config.get(key) for name, key in SCHEMA_KEYS.items()}
    values["modules_to_save"] = tuple(config.get("lora.modules_to_save") or ())
    if config.get("data.resize_embeddings") and not values["modules_to_save"]:  # else the whole modules train
        values["trainable_token_rows"] = len(config.get("data.add_special_tokens") or [])
    return make_settings(**{**values, **extra}, device=device)


def chunked_loss_changes(s: RunSettings) -> dict[str, Any]:
    """The `RunSettings` changes that turn the chunked loss on: the run's own chunk size, or the trainer's default
    when it has none (`--no-chunked-loss` and `train.loss_chunk_tokens: 0` leave it 0)."""
    chunk = s.loss_chunk_tokens if s.loss_chunk_tokens > 0 else _default("loss_chunk_tokens")
    return {"chunked_loss": True, "loss_chunk_tokens": chunk}
