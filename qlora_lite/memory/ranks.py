"""Memory per rank of a torchrun launch: data parallel or FSDP, from the single-GPU report, and how many GPUs a
model needs.

Data parallel (`train.fsdp: false`, the default when WORLD_SIZE > 1): every rank holds the single-GPU report's
whole footprint and nothing more: the adapters' fp32 master gradients are all-reduced once per optimizer step in
place, in the optimizer's flat gradient buffer (the report's fp32 gradients).

FSDP (`train.fsdp: true`; FSDP2 `fully_shard` on each decoder layer and on the root module), sharded over the
GPUs of one node (across nodes the shards are replicated: HSDP):
  sharded      the packed 4-bit codes of every quantized weight and every other parameter (embeddings, norms,
               lm_head, the LoRA A/B) with the adapters' gradients and optimizer state; the adapters are fp32
               under FSDP (`training.fsdp.shard_model`), so they are their own optimizer masters, and their one
               fp32 .grad takes the reduce-scatter and accumulates the micro-batches; FSDP2 shards dim 0 and
               pads it to a multiple of the shard count, so each tensor counts ceil(dim0 / n) rows
  replicated   the 4-bit quantization statistics (absmax, nested absmax, code tables:
               `model.quant.quant_state_tensors`), buffers, cuBLAS workspaces, the CUDA context, and every
               activation (each rank runs its own micro-batch of train.micro_batch_size)
  buffers      FSDP2 all-gathers one decoder layer's parameters for its forward and backward and prefetches the
               next: 2 x the largest layer unsharded (packed codes + its bf16 parameters + LoRA cast to bf16);
               the reduce-scatter of one layer's trainable gradients in fp32, twice for overlap (backward); the
               root's own parameters (embeddings, final norm, lm_head), gathered for the forward and kept
               until backward (FSDP2 does not reshard the root after its forward)

`rank_report(inv, settings)` uses `settings.gpus`, `settings.nodes` and `settings.fsdp`; `memory.gpu_plan.gpus_needed` finds
the fewest GPUs of a budget that fit, with the activation settings that make them fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError
from .constants import BF16, FP32
from .inventory import Inventory
from .persistent import optimizer_state_bytes, token_numels

# the single-GPU model's phases and persistent parts, which the FSDP report transforms part by part
from .report import COMPONENT_LABELS, MemoryReport, _persistent, _phases, describe_components, report_for
from .settings import RunSettings

RANK_COMPONENT_LABELS = {
    **COMPONENT_LABELS,
    "quantized_weights": "quantized base weights",
    "quantization_statistics": "4-bit statistics (replicated)",
    "fsdp_all_gather": "FSDP all-gather buffers",
    "fsdp_reduce_scatter": "FSDP reduce-scatter buffers",
    "fsdp_root_gathered": "gathered root parameters",
}
FSDP_LABELS = {
    "quantized_weights": "packed 4-bit codes (sharded)",
    "unquantized_weights": "unquantized weights (sharded)",
    "lora_adapters": "LoRA adapters (fp32, sharded)",
    "lora_gradients": "LoRA gradients (fp32, sharded)",
}
GPUS_PER_NODE = 8  # the search's upper end: FSDP shards within a node, so more nodes do not lower a rank's memory
MIN_SEARCH_SEQ = 512  # gpus_needed shortens the sequence down to this, no further
SEQ_STEP = 64  # a shortened sequence is rounded down to a multiple of this


# ------------------------------------------------------------------------------------------ layout


def _rows(shape: tuple[int, ...], n: int) -> int:
    """Elements of one FSDP2 shard of a tensor: dim 0 padded to a multiple of n, then divided."""
    if not shape:
        return 1
    return math.ceil(shape[0] / n) * math.prod(shape[1:])


@dataclass(frozen=True)
class Layout:
    """The tensors FSDP shards, by shape and decoder layer (None: the root module)."""

    packed: list[tuple[int, int | None]]  # bytes of each quantized weight's packed codes ([ceil(n/2), 1] uint8)
    statistics: int  # bytes of all quantization statistics (absmax, nested stats, code tables)
    plain: list[tuple[tuple[int, ...], int | None]]  # every other parameter (bf16), shape and layer
    added: list[tuple[tuple[int, ...], int | None]]  # LoRA A [r, in], B [out, r] and new-token deltas
    whole: list[tuple[tuple[int, ...], int | None]]  # parameters of modules trained whole (among `plain`)
    layers: int


def _layer_of(name: str, blocks: str | None) -> int | None:
    if not blocks or not name.startswith(blocks + "."):
        return None
    head = name[len(blocks) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def layout(inv: Inventory, s: RunSettings) -> Layout:
    """Shapes and layers of the tensors a rank holds a shard of, for the settings' targets and rank."""
    from ..model.targets import decoder_blocks_path
    from .persistent import quantized_weight_bytes

    targets = inv.targets(s.targets)
    blocks = decoder_blocks_path(inv.skeleton)
    quantized = {f"{t.path}.weight": t for t in targets}
    packed, plain, whole = [], [], []
    for name, param in inv.skeleton.named_parameters():  # tied parameters once, as the report counts them
        layer = _layer_of(name, blocks)
        if name in quantized:
            t = quantized[name]
            packed.append((math.ceil(t.out_features * t.in_features / 2), layer))
            continue
        shape = tuple(param.shape)
        plain.append((shape, layer))
        module = name.rsplit(".", 1)[0]
        if any(module == e or module.endswith(f".{e}") for e in s.modules_to_save):  # persistent.module_numels' rule
            whole.append((shape, layer))
    statistics = quantized_weight_bytes(targets, s) - sum(b for b, _ in packed) if s.bits == 4 else 0
    added: list[tuple[tuple[int, ...], int | None]] = []
    for t in targets:
        added += [((s.rank, t.in_features), t.layer), ((t.out_features, s.rank), t.layer)]
    rows = s.trainable_token_rows
    added += [((rows, numel // rows), None) for numel in token_numels(inv, rows)]
    return Layout(packed, statistics, plain, added, whole, inv.layers)


def _layer_bytes(lay: Layout) -> tuple[int, int, int]:
    """(largest decoder layer unsharded for compute, most trainable elements of one FSDP unit, the root unsharded)."""
    compute: dict[int | None, int] = {}
    trained: dict[int | None, int] = {}
    for nbytes, layer in lay.packed:
        compute[layer] = compute.get(layer, 0) + nbytes
    for shape, layer in lay.plain + lay.added:  # bf16 parameters; LoRA cast to bf16 for compute
        compute[layer] = compute.get(layer, 0) + BF16 * math.prod(shape)
    for shape, layer in lay.added + lay.whole:
        trained[layer] = trained.get(layer, 0) + math.prod(shape)
    in_layers = [v for k, v in compute.items() if k is not None]
    # the root's trained tensors (new-token rows, modules trained whole) are reduce-scattered as one unit too
    return max(in_layers, default=0), max(trained.values(), default=0), compute.get(None, 0)


# ------------------------------------------------------------------------------------------ report


@dataclass
class RankReport:
    """Bytes per component on one rank at the peak of a step, the total, and the launch it is for."""

    gpus: int
    nodes: int
    fsdp: bool
    shard: int  # GPUs one copy of the model is sharded over (GPUs per node under FSDP, else 1)
    components: dict[str, int]
    other_phases: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    total: int
    single_gpu_total: int  # the single-GPU report's total for the same settings
    details: dict[str, Any]
    notes: list[str]

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    @property
    def mode(self) -> str:
        """'fsdp', 'hsdp' (FSDP within nodes, replicated across), 'data parallel' or 'single GPU'."""
        if self.fsdp:
            return "hsdp" if self.nodes > 1 else "fsdp"
        return "data parallel" if self.gpus > 1 else "single GPU"

    def size(self, name: str) -> int:
        """Bytes of a component at the peak or, if not alive then, at its own phase's worst; 0 if absent."""
        return self.components.get(name, self.other_phases.get(name, 0))

    def fits(self, budget_bytes: int) -> bool:
        return self.total <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gpus_per_node"] = self.gpus_per_node
        out["mode"] = self.mode
        return out


def _data_parallel(report: MemoryReport, s: RunSettings) -> RankReport:
    notes = []
    if s.gpus > 1:
        notes.append(
            "data parallel: every rank holds the whole model; the adapters' fp32 master gradients are all-reduced "
            "in place, in the optimizer's flat gradient buffer (no extra memory)"
        )
    if s.nodes > 1:
        notes.append(f"{s.nodes} nodes: each rank's memory does not depend on the number of nodes")
    return RankReport(
        gpus=s.gpus,
        nodes=s.nodes,
        fsdp=False,
        shard=1,
        components=dict(report.components),
        other_phases=dict(report.other_phases),
        peak_phase=report.peak_phase,
        phases=dict(report.phases),
        total=report.total,
        single_gpu_total=report.total,
        details={"trainable_parameters": report.details["adapter_parameters"]},
        notes=notes,
    )


def _fsdp(inv: Inventory, report: MemoryReport, s: RunSettings) -> RankReport:
    if s.bits != 4:
        raise ConfigError(
            "fsdp shards 4-bit bases only (bitsandbytes' 8-bit layers cannot be sharded); use bits 4, or data "
            "parallel (fsdp off) to replicate the 8-bit base on every rank."
        )
    n = s.gpus // s.nodes
    lay = layout(inv, s)
    trainable = [shape for shape, _ in lay.added + lay.whole]
    shard_numels = [_rows(shape, n) for shape in trainable]
    fp32_grads = FP32 * sum(shard_numels)
    optimizer, _ = optimizer_state_bytes(shard_numels, s.optimizer_in_use, per_tensor=True)  # one master per shard
    # AdapterOptimizer keeps no fp32 copy of fp32 parameters: under FSDP the LoRA shards are their own masters
    optimizer -= FP32 * sum(_rows(shape, n) for shape, _ in lay.added)
    largest_layer, largest_trained, root = _layer_bytes(lay)
    packed_rank = sum(math.ceil(b / n) for b, _ in lay.packed)
    sharded = {
        "quantized_weights": packed_rank,
        "quantization_statistics": lay.statistics,
        "unquantized_weights": sum(BF16 * _rows(shape, n) for shape, _ in lay.plain),
        "lora_adapters": FP32 * sum(_rows(shape, n) for shape, _ in lay.added),  # fp32 parameters under FSDP
        "optimizer_state": optimizer,
        "optimizer_step": fp32_grads,
    }
    buffers = {
        "fsdp_all_gather": 2 * largest_layer,
        "fsdp_reduce_scatter": 2 * FP32 * largest_trained,
        "fsdp_root_gathered": root,
    }
    targets = inv.targets(s.targets)
    phases: dict[str, dict[str, int]] = {}
    for name, parts in _phases(inv, targets, s, _persistent(inv, targets, s)[0]).items():
        out: dict[str, int] = {}
        for key, value in parts.items():
            if key == "quantized_weights":
                out[key] = sharded[key]
                out["quantization_statistics"] = sharded["quantization_statistics"]
            elif key in ("lora_gradients", "gradient_accumulation"):
                # one fp32 .grad per shard, reduce-scattered into and accumulated over the micro-batches in place:
                # both the single GPU's bf16 .grad and its fp32 accumulation on the masters
                out["lora_gradients"] = fp32_grads
            else:
                out[key] = sharded.get(key, value) if value else value
        if name != "optimizer":
            out["fsdp_all_gather"] = buffers["fsdp_all_gather"]
            out["fsdp_root_gathered"] = buffers["fsdp_root_gathered"]
        if name == "backward":
            out["fsdp_reduce_scatter"] = buffers["fsdp_reduce_scatter"]
        phases[name] = out
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak = max(totals, key=totals.get)
    components = dict(phases[peak])
    for key in ("allocator_reserve", "cuda_context"):  # the reserve follows the activations, which do not change
        if key in report.components:
            components[key] = report.components[key]
    other: dict[str, int] = {}
    for parts in phases.values():
        for key, value in parts.items():
            if key not in components and value > other.get(key, 0):
                other[key] = value
    notes = [
        "FSDP memory per rank is this model's arithmetic (sharded tensors, FSDP2's buffers); "
        "no multi-GPU run has measured it yet"
    ]
    if s.nodes > 1:
        notes.append(
            f"{s.nodes} nodes: shards span the {n} GPUs of a node and are replicated across nodes (HSDP), "
            "so more nodes do not lower a rank's memory"
        )
    if n == 1:
        notes.append("FSDP on one GPU per node shards nothing; its buffers are still counted")
    return RankReport(
        gpus=s.gpus,
        nodes=s.nodes,
        fsdp=True,
        shard=n,
        components=components,
        other_phases=other,
        peak_phase=peak,
        phases=totals,
        total=sum(components.values()),
        single_gpu_total=report.total,
        details={
            "packed_bytes": sum(b for b, _ in lay.packed),
            "packed_bytes_per_rank": packed_rank,
            "statistics_bytes": lay.statistics,
            "largest_layer_bytes": largest_layer,
            "largest_layer_trainable_parameters": largest_trained,
            "root_bytes": root,
            "trainable_parameters": sum(math.prod(shape) for shape in trainable),
            "trainable_parameters_per_rank": sum(shard_numels),
        },
        notes=notes,
    )


def rank_report(inv: Inventory, s: RunSettings, report: MemoryReport | None = None) -> RankReport:
    """The memory of one rank for `s.gpus` GPUs on `s.nodes` nodes, FSDP when `s.fsdp` (see the module doc).

    `report`: the single-GPU report for `s`, when already computed."""
    s.validate()
    report = report if report is not None else report_for(inv, s)
    return _fsdp(inv, report, s) if s.fsdp else _data_parallel(report, s)


def rank_labels(rank: RankReport) -> dict[str, str]:
    """Component names for the per-rank table (FSDP's sharded and fp32 tensors say so)."""
    return {**RANK_COMPONENT_LABELS, **(FSDP_LABELS if rank.fsdp else {})}


def describe_rank_components(rank: RankReport, report: MemoryReport) -> dict[str, str]:
    """One line per per-rank component saying what is counted (for the command's table)."""
    how = describe_components(report)
    if not rank.fsdp:
        return how
    n, d, s = rank.shard, rank.details, report.settings
    share = f"1/{n} per rank (dim 0 padded)"
    how.update(
        quantized_weights=f"{report.details['targeted_layers']} layers' packed codes, {share}",
        quantization_statistics="absmax, nested absmax and code tables on every rank",
        unquantized_weights=f"embeddings, lm_head, norms, biases (bf16), {share}",
        lora_adapters=f"{d['trainable_parameters']:,} params, r={s.rank}, {share}",
        lora_gradients=f"fp32 .grad of the rank's shard, accumulated over {s.grad_accum} micro-batches",
        optimizer_state=f"{report.details['optimizer_in_use']}: moments of the rank's shard (fp32 LoRA: own masters)",
        optimizer_step="foreach AdamW temporaries of the rank's shard",
        fsdp_all_gather="2 x the largest decoder layer unsharded (one computing, one prefetched)",
        fsdp_reduce_scatter="2 x one layer's trainable gradients in fp32",
        fsdp_root_gathered="embeddings, final norm, lm_head unsharded from forward to backward",
    )
    return how
