"""The memory-budget model: bytes per component for a QLoRA run, the peak, and whether it fits a budget.

This module adds up the pieces into the peak of a training step. Weights, adapters, gradients and optimizer
state are counted exactly (`memory.inventory` from the model skeleton, `memory.persistent` from
bitsandbytes' storage layout; tests check them byte for byte against real tensors). Activations, logits and
temporaries follow the autograd saved-tensor rules of the code that runs, in the style of Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models" (`memory.activations`; tests check
the stored activations byte for byte on the CPU with `memory.probe.AllocationTracker`).

A training step goes through four phases; the peak is the largest of them:
  forward      persistent + stored activations so far + one layer's forward temporaries
  loss         persistent + stored activations + the logits / log-softmax tensors of the loss
  backward     persistent + stored activations + one layer recomputed (with checkpointing) + its gradients
               + the adapters' bf16 gradients
  optimizer    persistent + the fp32 accumulated gradients + optimizer temporaries
Persistent: weights, buffers, adapters, optimizer state, and (with grad_accum > 1) the fp32 gradients that
`AdapterOptimizer.accumulate_grads` keeps between micro-batches.
CUDA adds the caching allocator's reserve (blocks freed by one phase that the next cannot reuse), cuBLAS
workspaces, and the CUDA context (outside torch's allocator).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import ConfigError
from .activations import activation_model, attention_mode, layer_activations, loss_bytes, sdpa_masked
from .constants import BF16, FP32, GiB, MiB
from .inventory import Inventory, LinearInfo, build_inventory
from .persistent import (
    adapter_casts,
    added_bytes,
    added_numels,
    optimizer_state_bytes,
    quantized_weight_bytes,
    trainable_numels,
    unquantized_weight_bytes,
)
from .settings import RunSettings, make_settings
from .working_sets import working_sets

CUBLAS_WORKSPACE = 32 * MiB  # torch's default cuBLAS workspace on sm90 (CUBLAS_WORKSPACE_CONFIG=:4096:8), per handle
ALLOCATOR_SLACK = 0.03  # caching-allocator rounding/splitting on top of the phase model (uncalibrated guess, see docs)

COMPONENT_LABELS = {
    "quantized_weights": "quantized base weights",
    "unquantized_weights": "unquantized weights (bf16)",
    "buffers": "buffers",
    "lora_adapters": "LoRA adapters",
    "lora_gradients": "LoRA gradients",
    "adapter_casts": "bf16 copies of fp32 adapters",
    "gradient_accumulation": "fp32 gradients (accumulation)",
    "optimizer_state": "optimizer state",
    "workspaces": "cuBLAS workspaces",
    "activations": "stored activations",
    "layer_working_set": "layer recompute / working set",
    "logits_and_loss": "logits and loss",
    "dequant_temporaries": "dequantization temporaries",
    "optimizer_step": "optimizer step temporaries",
    "allocator_reserve": "allocator reserve",
    "cuda_context": "CUDA context",
}


@dataclass
class MemoryReport:
    """Bytes per component at the peak of a training step, the total, and what the estimate assumed.

    `components` holds what is alive at the peak (they add up to `total`); `other_phases` holds the
    transient components of the phases that are not the peak, for reference.
    """

    model: str
    model_type: str
    settings: RunSettings
    components: dict[str, int]
    other_phases: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    allocated_peak: int
    reserved_peak: int
    paged_bytes: int
    total: int
    details: dict[str, Any]
    notes: list[str]

    def size(self, name: str) -> int:
        """Bytes of a component, at the peak or (if not alive then) at its own phase's worst; 0 if absent."""
        return self.components.get(name, self.other_phases.get(name, 0))

    def fits(self, budget_bytes: int) -> bool:
        """True when the predicted total fits in `budget_bytes` of GPU memory."""
        return self.total <= budget_bytes

    def headroom(self, budget_bytes: int) -> int:
        """budget - total (negative when it does not fit)."""
        return budget_bytes - self.total

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything in the report."""
        out = asdict(self)
        out["settings"] = asdict(self.settings)
        return out


def _persistent(inv: Inventory, targets: list[LinearInfo], s: RunSettings) -> tuple[dict[str, int], int]:
    numels = trainable_numels(inv, targets, s)
    optimizer, paged = optimizer_state_bytes(numels, s.optimizer_in_use)
    parts = {
        "quantized_weights": quantized_weight_bytes(targets, s),
        "unquantized_weights": unquantized_weight_bytes(inv, targets),
        "buffers": inv.buffer_bytes,
        "lora_adapters": added_bytes(inv, targets, s),
        "optimizer_state": optimizer,
    }
    if s.device == "cuda":
        parts["workspaces"] = 2 * CUBLAS_WORKSPACE  # one cuBLAS handle for the forward thread, one for autograd's
    return parts, paged


def _check_rank(targets: list[LinearInfo], rank: int) -> None:
    for t in targets:
        if rank > min(t.in_features, t.out_features):
            raise ConfigError(
                f"rank is {rank}, larger than the smaller side ({min(t.in_features, t.out_features)}) of layer {t.path} "
                f"[{t.out_features} x {t.in_features}]; use rank <= {min(t.in_features, t.out_features)}."
            )


def _phases(
    inv: Inventory, targets: list[LinearInfo], s: RunSettings, persistent: dict[str, int]
) -> dict[str, dict[str, int]]:
    acts = activation_model(inv, targets, s)
    loss_peak, _, _ = loss_bytes(inv, s)
    ws = working_sets(inv, targets, acts, s)
    numel = sum(trainable_numels(inv, targets, s))
    added = sum(added_numels(inv, targets, s))
    # .grad of each trained tensor, in its own dtype (the adapters': lora.adapter_dtype), from backward to accumulate
    adapter_grads = added_bytes(inv, targets, s) + BF16 * (numel - added)
    casts = adapter_casts(targets, s)
    fp32_grads = FP32 * numel  # AdapterOptimizer.accumulate_grads: fp32 .grad on the masters until the step
    accumulated = fp32_grads if s.grad_accum > 1 else 0  # micro-batches after the first run with them alive
    step_temp = FP32 * numel if s.optimizer_in_use == "adamw" and s.device == "cuda" else 0  # foreach AdamW's sqrt list
    stored = acts.stored_layers + acts.misc
    phases = {
        "forward": {
            **persistent,
            "gradient_accumulation": accumulated,
            "activations": stored + (0 if any(acts.checkpointed) else acts.masks),
            "layer_working_set": ws["forward"][0],
            "dequant_temporaries": ws["forward"][1],
            "adapter_casts": casts,
        },
        "loss": {
            **persistent,
            "gradient_accumulation": accumulated,
            "adapter_casts": casts,
            "activations": stored + acts.final_norm,
            "logits_and_loss": loss_peak,
        },
        "backward": {
            **persistent,
            "lora_gradients": adapter_grads,
            "gradient_accumulation": accumulated,
            "adapter_casts": casts,
            "activations": stored,
            "layer_working_set": ws["backward"][0],
            "dequant_temporaries": ws["backward"][1],
        },
        "optimizer": {**persistent, "gradient_accumulation": fp32_grads, "optimizer_step": step_temp},
    }
    return {name: {k: v for k, v in parts.items() if v or k in persistent} for name, parts in phases.items()}


def _reserve(
    inv: Inventory, targets: list[LinearInfo], s: RunSettings, phases: dict[str, dict[str, int]], persistent: int
) -> tuple[int, str]:
    """(reserved bytes at the reserved peak, its phase) under the CUDA caching allocator."""
    _, _, cached_logits = loss_bytes(inv, s)
    forward_ws = sum(working_sets(inv, targets, activation_model(inv, targets, s), s)["forward"])
    extra = {"loss": cached_logits + forward_ws}  # freed blocks too small for the loss's allocations stay cached
    reserved = {name: sum(parts.values()) + extra.get(name, 0) for name, parts in phases.items()}
    phase = max(reserved, key=reserved.get)
    slack = ALLOCATOR_SLACK * (reserved[phase] - persistent)  # rounding to 512 B / 2 MiB blocks and splitting
    return int(reserved[phase] + slack), phase


def _notes(inv: Inventory, s: RunSettings, paged: int) -> list[str]:
    notes = []
    if not inv.arch.checked:
        notes.append(
            f"activation formulas for model_type {inv.model_type!r} follow Llama's layer layout and are not checked against it"
        )
    if s.attn_implementation and s.attn_implementation != inv.attn_implementation:
        notes.append(
            f"attention counted as {s.attn_implementation}; transformers picks {inv.attn_implementation} for this config"
        )
    if paged:
        notes.append(
            f"{paged / GiB:.2f} GiB of optimizer state is paged (unified memory): counted, but it can move to CPU RAM under pressure"
        )
    if s.bits == 8 and s.gradient_checkpointing:
        notes.append(
            "8-bit layers keep their inputs for backward outside checkpointing (bitsandbytes MatMul8bitLt ctx.tensors)"
        )
    if inv.max_positions and s.seq_len > inv.max_positions:
        notes.append(
            f"seq_len {s.seq_len} is longer than the model's context ({inv.max_positions} positions); training would refuse it"
        )
    if s.targets != "all-linear":
        notes.append("linear layers outside the LoRA targets stay bf16: the trainer quantizes only lora.target_modules")
    if sdpa_masked(inv, s) and attention_mode(inv, s) == "flash":
        why = "padded micro-batches" if s.padded else f"sequences longer than the sliding window ({inv.sliding_window})"
        notes.append(f"{why} need an attention mask: SDPA's memory-efficient kernel with K/V repeated (counted)")
    return notes


def estimate_memory(config_or_path: Any, **run_settings: Any) -> MemoryReport:
    """Predict the GPU memory of one QLoRA training step; see the module doc for the model.

    `config_or_path`: a `TrainConfig` (its model and settings; `run_settings` may add memory-only ones such as
    `device`), or a model directory, a config.json path, a transformers config, a dict or a preset name
    (`preset_names()`) with `run_settings` the fields of `RunSettings` (bits, rank, targets, seq_len,
    batch_size, gradient_checkpointing, optimizer, loss_chunk_tokens, ...), whose defaults are the trainer's.
    Raises `ConfigError` for settings that cannot describe a run and for unknown presets.
    """
    from ..config.settings import TrainConfig
    from .settings import settings_from_config

    if isinstance(config_or_path, TrainConfig):
        config_or_path.validate(for_training=False)
        settings = settings_from_config(config_or_path, **run_settings)
        config_or_path = config_or_path.model
    else:
        settings = make_settings(**run_settings)
    return report_for(build_inventory(config_or_path), settings)


def report_for(inv: Inventory, s: RunSettings) -> MemoryReport:
    """The report for an already built inventory (fast: pure arithmetic, used by the recommendations)."""
    targets = inv.targets(s.targets)
    _check_rank(targets, s.rank)
    persistent, paged = _persistent(inv, targets, s)
    phases = _phases(inv, targets, s, persistent)
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    allocated = totals[peak_phase]  # what torch.cuda.max_memory_allocated would show
    components = dict(phases[peak_phase])
    if s.device == "cuda":
        # the table shows the phase where the reserve peaks (usually the same one), plus the reserve on top of it
        reserved, peak_phase = _reserve(inv, targets, s, phases, sum(persistent.values()))
        components = dict(phases[peak_phase])
        components["allocator_reserve"] = reserved - totals[peak_phase]
        components["cuda_context"] = s.cuda_context_bytes
    else:
        reserved = allocated
    other = {}
    for parts in phases.values():
        for key, value in parts.items():
            if key not in components and value > other.get(key, 0):
                other[key] = value
    acts = activation_model(inv, targets, s)
    _, loss_kept, _ = loss_bytes(inv, s)
    first = [t for t in targets if t.layer == 0]
    details = {
        "parameters": inv.total_params,
        "targeted_layers": len(targets),
        "adapter_parameters": sum(trainable_numels(inv, targets, s)),
        "attention": attention_mode(inv, s),
        "default_attention": "eager" if inv.attn_implementation == "eager" else "flash",
        "layers": inv.layers,
        "vocab_size": inv.vocab,
        "optimizer_in_use": s.optimizer_in_use,
        "tokens_per_micro_batch": s.tokens,
        "activation_bytes_per_token_per_layer": acts.full_layer.per_token,
        "activation_bytes_per_seq2_per_layer": acts.full_layer.per_square,
        "checkpointed_bytes_per_token_per_layer": acts.checkpoint_per_layer_token,
        "first_layer_activation_bytes": layer_activations(inv, first, s, first=True).at(s.batch_size, s.seq_len),
        "stored_after_forward": acts.stored_layers + acts.misc + acts.final_norm + loss_kept,
        "phase_totals": totals,
    }
    return MemoryReport(
        model=inv.name,
        model_type=inv.model_type,
        settings=s,
        components=components,
        other_phases=other,
        peak_phase=peak_phase,
        phases=totals,
        allocated_peak=allocated,
        reserved_peak=reserved,
        paged_bytes=paged,
        total=sum(components.values()),
        details=details,
        notes=_notes(inv, s, paged),
    )


def with_settings(report: MemoryReport, **changes: Any) -> RunSettings:
    """The report's settings with some fields changed (validated)."""
    settings = replace(report.settings, **changes)
    settings.validate()
    return settings


def describe_components(report: MemoryReport) -> dict[str, str]:
    """One line per component saying what is counted (for the command's table)."""
    s, d = report.settings, report.details
    quant = (
        f"{s.quant_type.upper()}, absmax per {s.blocksize}" + (" + double-quant stats" if s.double_quant else "")
        if s.bits == 4
        else "LLM.int8 codes + fp32 row scales"
    )
    full = f"{d['activation_bytes_per_token_per_layer']:,} B/token" + (
        f" + {d['activation_bytes_per_seq2_per_layer']} B/seq^2" if d["activation_bytes_per_seq2_per_layer"] else ""
    )
    kept = f"{d['checkpointed_bytes_per_token_per_layer']:,} B/token"
    ckpt = (
        f"{kept} (checkpointing; {full} without)" if s.gradient_checkpointing else f"{full} ({kept} with checkpointing)"
    )
    if s.gradient_checkpointing and s.checkpoint_every > 1:
        ckpt = f"{full}; one layer in {s.checkpoint_every} checkpointed: {kept}"
    loss_tokens = min(s.loss_chunk_tokens, s.tokens) if s.chunked_loss else s.tokens
    dtype = "fp32" if s.adapter_dtype == "float32" else "bf16"
    return {
        "quantized_weights": f"{d['targeted_layers']} layers, {s.bits}-bit {quant}",
        "unquantized_weights": "embeddings, lm_head (tied once), norms, biases",
        "buffers": "rotary tables and other buffers",
        "lora_adapters": f"{d['adapter_parameters']:,} params, r={s.rank}, {dtype}",
        "lora_gradients": f"one {dtype} .grad per adapter tensor (during backward)",
        "adapter_casts": "bf16 autocast's copies of A and B, from the forward to their backward",
        "gradient_accumulation": f"fp32 .grad on the masters ({s.grad_accum} micro-batches per step)",
        "optimizer_state": f"{d['optimizer_in_use']}: fp32 masters + moments",
        "workspaces": "2 cuBLAS handles x 32 MiB",
        "activations": f"{d['layers']} layers x {ckpt}",
        "layer_working_set": (
            "one layer recomputed + its gradients"
            if s.gradient_checkpointing
            else "one layer's gradients and temporaries"
        ),
        "logits_and_loss": (
            f"fp32 + bf16 [{loss_tokens:,} x {d['vocab_size']:,}] per loss chunk"
            if s.chunked_loss
            else f"3 x fp32 [{loss_tokens:,} x {d['vocab_size']:,}] in log_softmax backward"
        ),
        "dequant_temporaries": "largest weight dequantized to bf16",
        "optimizer_step": "torch AdamW's foreach temporaries",
        "allocator_reserve": "freed blocks the peak cannot reuse + 3% slack",
        "cuda_context": "CUDA context and kernels (outside torch)",
    }
