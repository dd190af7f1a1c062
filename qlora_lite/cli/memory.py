"""`qlora-lite memory`: the predicted peak GPU memory of a run, per component, against a budget.

The run is described by a training YAML (`qlora-lite memory run.yaml`) or by a model dir / preset with the
trainer's defaults; the flags below and any `--section.key value` override change it. Either way the
settings go through `memory.settings.settings_from_config`, as the trainer's out-of-memory advice does.
`--gpus N [--nodes M] [--fsdp]` adds the memory of one rank of a torchrun launch (`memory.ranks`) and, with a
budget and FSDP, how many GPUs of that size the model needs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import console

# flag -> config key it overrides (the defaults are the config's, i.e. the trainer's)
FLAG_KEYS = {
    "bits": "quant.bits", "quant_type": "quant.quant_type", "rank": "lora.r", "lora_dropout": "lora.dropout",
    "seq_len": "data.max_seq_len", "batch_size": "train.micro_batch_size", "grad_accum": "train.grad_accum",
    "optimizer": "train.optimizer", "checkpoint_every": "train.checkpoint_every",
}  # fmt: skip


def add_parser(sub: Any) -> None:
    """Register `memory` and its flags."""
    p = sub.add_parser(
        "memory",
        help="predict GPU memory for a run and say whether it fits",
        description="Predict the peak GPU memory of QLoRA training per component, check it against a budget, "
        "and recommend the largest micro-batch, the longest sequence and the setting that saves most. "
        "Give a training YAML (its settings are used) or a model dir / preset (the trainer's defaults); "
        "flags and --section.key value overrides change either.",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="training YAML, model directory (config.json is enough) or a preset (see --list-presets)",
    )
    p.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    p.add_argument("--bits", type=int, default=None, help="4 (NF4/FP4) or 8 (LLM.int8); quant.bits")
    p.add_argument("--quant-type", default=None, help="4-bit data type: nf4 or fp4; quant.quant_type")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit without double quantization of the absmax")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank; lora.r")
    p.add_argument(
        "--targets", default=None, help="all-linear, or module names such as q_proj,v_proj; lora.target_modules"
    )
    p.add_argument(
        "--lora-dropout", type=float, default=None, help="LoRA dropout (> 0 keeps a copy of each LoRA input)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence; data.max_seq_len")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch; train.micro_batch_size")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step; train.grad_accum")
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="recompute only every k-th layer, keep the others' activations (faster, more memory); "
        "train.checkpoint_every",
    )
    p.add_argument("--optimizer", default=None, help="paged_adamw_8bit, adamw_8bit or adamw; train.optimizer")
    p.add_argument(
        "--chunked-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lm_head + cross-entropy in chunks (train.loss_chunk_tokens), as the trainer does by default",
    )
    p.add_argument("--offload-activations", action="store_true", help="checkpointed layer inputs kept in CPU memory")
    p.add_argument(
        "--tiled-mlp", action="store_true", help="feed-forward norm + MLP over sequence tiles; train.tiled_mlp"
    )
    p.add_argument(
        "--padding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="micro-batches contain padding (default: when micro-batch > 1 without packing)",
    )
    p.add_argument(
        "--attn", default=None, help="attention implementation to count: sdpa or eager (default: transformers' pick)"
    )
    p.add_argument("--gpu-memory", default=None, help="budget such as 12GiB, or a GPU name such as rtx-4090-24gb")
    p.add_argument(
        "--gpus", type=int, default=1, help="GPUs of a torchrun launch, all nodes together: the report per rank"
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (FSDP shards within a node)")
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shard the 4-bit base and adapters over the GPUs of a node (default: train.fsdp, off: data parallel); "
        "with --gpu-memory, say how many GPUs the model needs",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(handler=run, accepts_overrides=True)


def _overrides(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """The flags as config overrides, then the explicit --section.key ones (which win)."""
    out: dict[str, Any] = {
        key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None
    }
    if args.targets is not None:
        out["lora.target_modules"] = (
            args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t.strip()]
        )
    if args.no_double_quant:
        out["quant.double_quant"] = False
    if args.no_checkpointing:
        out["train.gradient_checkpointing"] = False
    if args.offload_activations:
        out["train.offload_activations"] = True
    if args.tiled_mlp:
        out["train.tiled_mlp"] = True
    if args.chunked_loss is False:
        out["train.loss_chunk_tokens"] = 0
    if args.fsdp is not None:
        out["train.fsdp"] = args.fsdp
    return {**out, **extra}


def _checkpointing_text(s: Any) -> str:
    if not s.gradient_checkpointing:
        return "off"
    return "on" if s.checkpoint_every == 1 else f"every {s.checkpoint_every} layers"


def run_config(args: argparse.Namespace, extra: dict[str, Any]):
    """The training config the command describes (YAML or model/preset, with flags and overrides applied)."""
    from ..config.load import config_with_overrides, load_config
    from ..config.settings import default_of
    from ..errors import UsageError

    if not args.model:
        raise UsageError(
            "memory needs a training YAML, a model directory or a preset; see `qlora-lite memory --list-presets`."
        )
    overrides = _overrides(args, extra)
    path = Path(args.model)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config = load_config(path, overrides, for_training=False)
    else:
        config = config_with_overrides({"model": args.model, **overrides}, for_training=False)
    if args.chunked_loss and config.train.loss_chunk_tokens == 0:
        config.train.loss_chunk_tokens = default_of("train.loss_chunk_tokens")
    return config


def run(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    """Print the memory report (a table, or JSON with --json)."""
    from rich.table import Table

    from ..memory.advice import advise, gib, parse_budget
    from ..memory.gpu_plan import gpus_needed
    from ..memory.inventory import build_inventory, preset_names
    from ..memory.ranks import rank_report
    from ..memory.report import COMPONENT_LABELS, describe_components, report_for
    from ..memory.settings import settings_from_config

    out = console()
    if args.list_presets:
        for name in preset_names():
            out.print(name)
        return 0
    config = run_config(args, extra)
    settings = settings_from_config(
        config, device="cuda", padding=args.padding, attn_implementation=args.attn, gpus=args.gpus, nodes=args.nodes
    )
    budget, label = parse_budget(args.gpu_memory) if args.gpu_memory is not None else (None, None)
    inventory = build_inventory(config.model)
    report = report_for(inventory, settings)
    advice = advise(inventory, report, budget, label)
    rank = rank_report(inventory, settings, report)
    plan = gpus_needed(inventory, settings, budget, label) if _wants_plan(settings, rank, budget) else None
    if args.json:
        per_rank = {
            **rank.to_dict(),
            "fits": rank.fits(budget) if budget is not None else None,
            "headroom": budget - rank.total if budget is not None else None,
            "gpus_needed": plan.to_dict() if plan is not None else None,
        }
        out.print_json(json.dumps({**report.to_dict(), "advice": advice.to_dict(), "per_rank": per_rank}))
        return 0
    s = settings
    quant = f"{s.bits}-bit" + (
        f" {s.quant_type}{' + double quant' if s.double_quant else ''}" if s.bits == 4 else " LLM.int8"
    )
    out.print(
        f"[bold]{report.model}[/] ({report.details['parameters'] / 1e9:.2f}B params): {quant}, r={s.rank} on "
        f"{report.details['targeted_layers']} layers, seq {s.seq_len} x micro-batch {s.batch_size}, grad_accum "
        f"{s.grad_accum}, checkpointing {_checkpointing_text(s)}, "
        f"{report.details['optimizer_in_use']}, {report.details['attention']} attention"
        f"{', chunked loss' if s.chunked_loss else ''}"
    )
    table = Table(show_footer=True)
    how = describe_components(report)
    table.add_column("component", footer="total")
    table.add_column("GiB", justify="right", footer=gib(report.total))
    table.add_column("what is counted", footer=f"peak in the {report.peak_phase} phase")
    for key, value in report.components.items():
        table.add_row(COMPONENT_LABELS.get(key, key), gib(value), how.get(key, ""))
    for key, value in report.other_phases.items():
        table.add_row(
            f"[dim]{COMPONENT_LABELS.get(key, key)}[/]",
            f"[dim]({gib(value)})[/]",
            "[dim]other phase, not at the peak[/]",
        )
    out.print(table)
    for note in report.notes:
        out.print(f"note: {note}")
    if advice.budget is not None:
        verdict = "[green]fits[/]" if advice.fits else "[red]does not fit[/]"
        margin = f"{gib(advice.headroom)} GiB headroom" if advice.fits else f"over by {gib(-advice.headroom)} GiB"
        out.print(f"verdict: {verdict} in {gib(advice.budget)} GiB ({advice.budget_label}): {margin}")
        out.print(f"largest micro-batch at seq {s.seq_len}: {advice.max_batch_size}")
        limit = " (the model's context length)" if advice.max_seq_len == advice.seq_limit else ""
        out.print(f"longest sequence at micro-batch 1: {advice.max_seq_len:,} tokens{limit}")
        if advice.faster:
            fast = advice.faster
            out.print(
                f"faster with the spare memory: {fast.name}: +{gib(-fast.saves)} GiB -> {gib(fast.total)} GiB "
                f"({', '.join(f'train.{k}: {str(v).lower()}' for k, v in fast.changes.items())})"
            )
    if advice.best_switch:
        best = advice.best_switch
        out.print(f"biggest single saving: {best.name}: -{gib(best.saves)} GiB -> {gib(best.total)} GiB")
        for other in advice.switches[1:]:
            out.print(f"  then: {other.name}: -{gib(other.saves)} GiB -> {gib(other.total)} GiB")
    if settings.gpus > 1 or settings.fsdp:
        _print_ranks(out, rank, report, budget, label, plan)
    return 0


def _wants_plan(settings: Any, rank: Any, budget: int | None) -> bool:
    """Whether to search how many GPUs fit: a budget, a 4-bit base, and FSDP asked for, or data parallel on several
    GPUs that does not fit (the search then says what --fsdp would need)."""
    if budget is None or settings.bits != 4:
        return False
    return settings.fsdp or (settings.gpus > 1 and rank.total > budget)


def _print_ranks(out: Any, rank: Any, report: Any, budget: int | None, label: str | None, plan: Any) -> None:
    """The per-rank table of a launch on several GPUs (or FSDP), its verdict and the GPUs the model needs."""
    from rich.table import Table

    from ..memory.advice import gib
    from ..memory.ranks import GPUS_PER_NODE, MIN_SEARCH_SEQ, describe_rank_components, rank_labels

    nodes = f" on {rank.nodes} nodes" if rank.nodes > 1 else ""
    how_split = {
        "fsdp": f"FSDP, sharded over {rank.shard}",
        "hsdp": f"FSDP within each node (sharded over {rank.shard}), replicated across {rank.nodes} nodes",
        "data parallel": "data parallel, the whole model on every rank",
        "single GPU": "one GPU",
    }[rank.mode]
    out.print(f"[bold]per rank[/], {rank.gpus} GPU{'s' if rank.gpus > 1 else ''}{nodes} ({how_split}):")
    table = Table(show_footer=True)
    how, labels = describe_rank_components(rank, report), rank_labels(rank)
    table.add_column("component", footer="total per rank")
    table.add_column("GiB", justify="right", footer=gib(rank.total))
    table.add_column("what is counted", footer=f"peak in the {rank.peak_phase} phase")
    for key, value in rank.components.items():
        table.add_row(labels.get(key, key), gib(value), how.get(key, ""))
    for key, value in rank.other_phases.items():
        table.add_row(
            f"[dim]{labels.get(key, key)}[/]",
            f"[dim]({gib(value)})[/]",
            "[dim]other phase, not at the peak[/]",
        )
    out.print(table)
    for note in rank.notes:
        out.print(f"note: {note}")
    if budget is None:
        return
    headroom = budget - rank.total
    verdict = "[green]fits[/]" if headroom >= 0 else "[red]does not fit[/]"
    margin = f"{gib(headroom)} GiB headroom" if headroom >= 0 else f"over by {gib(-headroom)} GiB"
    out.print(f"verdict per rank: {verdict} in {gib(budget)} GiB ({label}): {margin}")
    if not _wants_plan(report.settings, rank, budget):
        return
    prefix = "" if rank.fsdp else "with --fsdp: "
    if plan is None:
        out.print(
            f"{prefix}does not fit on one node of {GPUS_PER_NODE} × {label} GPUs with FSDP, even with micro-batch 1, "
            f"activation offload and seq {min(MIN_SEARCH_SEQ, report.settings.seq_len)}; more nodes do not help (FSDP shards within a node and "
            "replicates across nodes)"
        )
        return
    out.print(f"{prefix}{plan.sentence()}")
    if plan.changes:
        out.print(f"  changed from the settings above: {'; '.join(plan.changes)}")
