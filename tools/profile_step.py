"""Where one training step's time goes: torch.profiler over a few steps of one `tools/bench.py` side, in process.

Builds the side exactly as `tools/bench.py` does (same model, data, settings), runs warm-up steps, times some steps,
then profiles a few more and prints the step time, the self time per step of each kind of work (matrix products,
attention kernels, bitsandbytes' kernels, the rest; CPU only) and the busiest operators (CUDA: kernels). The matrix products and attention
kernels are work every side must do for the same tokens; the rest is where implementations differ.

    python tools/profile_step.py --side qlora                     # qlora-lite at bench's default CPU shape
    python tools/profile_step.py --side qlora --no-recompute      # activation checkpointing off
    python tools/profile_step.py --side lean --seq-len 512 --micro-batch 2
    python tools/profile_step.py --device cuda --side qlora       # the busiest CUDA kernels (no kinds of work)

Not a test: it prints where the time goes; it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the sides are built as the benchmark builds them)

# Kinds of work, by operator name: the first matching prefix wins.
KINDS = (
    ("matrix products", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")),
    ("attention kernels", ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")),
    ("bitsandbytes (4-bit dequantize, 8-bit optimizer)", ("bitsandbytes::",)),
)
OTHER = "the rest (elementwise, casts, copies, reductions, dispatch)"


def kind_of(name: str) -> str:
    """The kind of work an operator belongs to."""
    return next((kind for kind, prefixes in KINDS if name.startswith(prefixes)), OTHER)


def build(args):
    """The side's step function, built as `tools/bench.py`'s child builds it."""
    import torch

    device = torch.device(args.device)
    if args.model_dir:
        return _build(Path(args.model_dir), device, args)
    with tempfile.TemporaryDirectory(prefix="qlora-profile-") as root:  # the weights are in memory once built
        return _build(bench.make_model(Path(root), args.model, max(args.seq_len, 512)), device, args)


def _build(model_dir: Path, device, args):
    if args.side == bench.OURS:
        return bench.build_qlora(model_dir, device, args)
    return bench.build_baseline(model_dir, device, args, lean=args.side == "lean")


def profile(args) -> None:
    """Time and profile the side, and print the summary."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(args.seed)
    step = build(args)
    vocab = bench.MODELS[args.model]["vocab_size"]
    total = args.warmup + args.steps + args.profile_steps
    batches = [b.to(args.device) for b in bench.make_batches(total, args.micro_batch, args.seq_len, vocab, args.seed)]
    for ids in batches[: args.warmup]:
        step(ids)
    times = []
    for ids in batches[args.warmup : args.warmup + args.steps]:
        start = time.perf_counter()
        step(ids)  # returns a float: the step's device work is complete
        times.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for ids in batches[args.warmup + args.steps :]:
            step(ids)
    events = [e for e in prof.key_averages() if e.key]
    on_device = args.device == "cuda"

    def self_us(event) -> float:
        return event.self_device_time_total if on_device else event.self_cpu_time_total

    per_step = {}
    for event in events:
        per_step[kind_of(event.key)] = per_step.get(kind_of(event.key), 0.0) + self_us(event) / args.profile_steps
    measured = sum(per_step.values())
    where = "device" if on_device else "CPU"
    print(
        f"side {args.side}, {args.device}, model {args.model}, seq {args.seq_len} x {args.micro_batch}, "
        f"recompute {'off' if not args.gradient_checkpointing else f'every {args.checkpoint_every}'}: "
        f"step {statistics.median(times) * 1000:.1f} ms (median of {len(times)}, unprofiled)"
    )
    print(f"self {where} time per profiled step: {measured / 1000:.1f} ms")
    if on_device:  # device time belongs to kernels, whose names are the library's, not the operators' above
        print("  (kinds of work are read from CPU operator names: on CUDA only the busiest kernels are listed)")
    else:
        for kind in [k for k, _ in KINDS] + [OTHER]:
            share = per_step.get(kind, 0.0)
            print(f"  {kind:52s} {share / 1000:8.1f} ms  {share / measured:6.1%}")
    print(f"busiest operators (self {where} ms per step):")
    for event in sorted(events, key=self_us, reverse=True)[: args.rows]:
        ms, calls = self_us(event) / args.profile_steps / 1000, event.count // args.profile_steps
        print(f"  {event.key[:60]:60s} {ms:8.2f}  x{calls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", default=bench.OURS, choices=[bench.OURS, *bench.BASELINES])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, choices=sorted(bench.MODELS))
    parser.add_argument("--model-dir", default=None, help="a model tools/bench.py made (default: made afresh)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (not profiled)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="qlora-lite's train.checkpoint_every")
    parser.add_argument(
        "--no-recompute", dest="gradient_checkpointing", action="store_false",
        help="qlora-lite with train.gradient_checkpointing off",
    )  # fmt: skip
    # absent, these take tools/bench.py's defaults (below)
    parser.add_argument("--optimizer", default=argparse.SUPPRESS, choices=["paged_adamw_8bit", "adamw_8bit", "adamw"])
    parser.add_argument("--loss-chunk", type=int, default=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("llama-1b-128k" if args.device == "cuda" else "llama-small")
    args.seq_len = args.seq_len or (2048 if args.device == "cuda" else 256)
    # what tools/bench.py's builders read and these flags leave (rank, alpha, lr, seed, offload, ...): its defaults
    args = argparse.Namespace(**{**vars(bench.build_parser().parse_args([])), **vars(args)})
    profile(args)


if __name__ == "__main__":
    main()
