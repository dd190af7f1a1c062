"""Side-by-side training benchmark: qlora-lite vs transformers + peft + bitsandbytes, two ways.

Same model config, random weights, data, seed, rank, alpha, targets, sequence length, micro-batch,
gradient checkpointing (non-reentrant), optimizer and clipping (1.0), every side in its own fresh process.
Two baselines (`--baselines lean,common`, both by default):

  lean    what a careful peft user runs: `BitsAndBytesConfig(nf4, double quant, bf16 compute)` + peft `LoraConfig`,
          no `prepare_model_for_kbit_training` (embeddings, norms and lm_head stay bf16), checkpointing enabled
          directly with `use_reentrant=False` and input grads enabled as transformers does. The headline ratio.
  common  as users commonly run it: the same plus `prepare_model_for_kbit_training`, which upcasts embeddings,
          norms and lm_head to fp32.

Both step as transformers' `Trainer(bf16=True, max_grad_norm=1.0)` does; qlora-lite steps through its trainer's own
`train_step`. Each repeat runs the sides in one order and the next repeat in the reverse order (lean qlora common,
then common qlora lean, ...), so qlora-lite always runs next to the lean baseline and no side always runs first.
Ratios are per pair: each repeat's qlora-lite figure over the same repeat's baseline figure, reported as the median
and min-max over the repeats. Also printed: median tokens/s, peak memory (CUDA: max allocated / reserved; CPU: peak
RSS of the training phase), each side's process CPU time (getrusage of the child) and the cores its timed steps
kept busy, the losses, and the load average before and after. It warns when the machine was not quiet (load or busy
cores above cores / 2 before the run) and names each run whose steps kept too few cores busy; the ratios with such a
run are starred and also given without it. `--json` prints one machine-readable line on stdout instead (settings,
versions, load, order, per-side medians, per-pair ratios, every run; the text goes to stderr).

`--compile` adds a side, qlora-lite with `train.compile` (its decoder layers compiled regionally), run in the
same alternation next to eager qlora-lite, and prints the compiled / eager ratios and the compile time: the compiled
first step minus the eager first step (each compiled process starts from an empty inductor cache, so this is what
a run pays the first time), and the steps it takes to earn it back.

    python tools/bench.py --device cpu --steps 8 --repeats 3               # small Llama-shaped model, seq 256
    python tools/bench.py --device cpu --seq-len 512 --micro-batch 2       # 1024 tokens per step
    python tools/bench.py --device cpu --compile                           # plus qlora-lite compiled
    python tools/bench.py --device cpu --baselines lean --json             # one baseline, one JSON line
    python tools/bench.py --device cuda --model llama-1b-128k --seq-len 2048 --micro-batch 1

Not a test: benchmarks print ratios; they do not assert.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OURS = "qlora"  # qlora-lite, eager
COMPILED = "qlora-compiled"  # the side with train.compile
BASELINES = ("lean", "common")  # transformers + peft + bitsandbytes: without / with prepare_model_for_kbit_training
LEGACY_BASELINE = "baseline"  # tools/gpu_suite.py's name for the common baseline (its speed section runs `child`)
LABELS = {OURS: "qlora-lite", COMPILED: "compiled", "lean": "lean", "common": "common", LEGACY_BASELINE: "baseline"}
MAX_GRAD_NORM = 1.0  # train.max_grad_norm's default, and transformers' Trainer's
MODELS = {
    # hidden, layers, intermediate, heads, kv heads, vocab
    "llama-small": dict(
        hidden_size=512,
        layers=4,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "llama-1b-128k": dict(
        hidden_size=2048,
        layers=16,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def make_model(root: Path, name: str, seq_len: int) -> Path:
    """A Llama-shaped model with random weights, saved in bf16 safetensors."""
    import torch

    from qlora_lite.model.tiny import save_tiny_model

    spec = dict(MODELS[name])
    return save_tiny_model(
        root / name,
        "llama",
        dtype=torch.bfloat16,
        with_tokenizer=False,
        max_position_embeddings=max(seq_len, 256),
        tie_word_embeddings=False,
        **spec,
    )


def make_batches(steps: int, micro_batch: int, seq_len: int, vocab: int, seed: int):
    """Learnable synthetic sequences: a random motif of 8-32 tokens repeated to fill each sequence."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        rows = []
        for _ in range(micro_batch):
            motif = torch.randint(3, vocab, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g)
            rows.append(motif.repeat(seq_len // motif.numel() + 1)[:seq_len])
        batches.append(torch.stack(rows))
    return batches


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def build_qlora(model_dir: Path, device, args):
    """qlora-lite as `qlora-lite train` runs it: the trainer's setup and its one training step."""
    import torch

    from qlora_lite import apply_lora, load_quantized
    from qlora_lite.training.checkpointing import enable_gradient_checkpointing
    from qlora_lite.training.compile import compile_decoder_layers
    from qlora_lite.training.optim import AdapterOptimizer
    from qlora_lite.training.step import train_step

    model, _ = load_quantized(
        model_dir, bits=4, quant_type="nf4", double_quant=True, device=device, load_tokenizer=False
    )
    apply_lora(model, r=args.rank, alpha=args.alpha, dropout=0.0, target_modules="all-linear", seed=args.seed)
    if getattr(args, "gradient_checkpointing", True):  # tools/profile_step.py's --no-recompute turns it off
        enable_gradient_checkpointing(model, offload=args.offload, every=args.checkpoint_every)
    if args.side == COMPILED:
        compile_decoder_layers(model)  # where prepare_run calls it: after checkpointing, before the optimizer
    model.train()
    optimizer = AdapterOptimizer(model.parameters(), args.optimizer, lr=args.lr)

    def step(ids):
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        return train_step(model, optimizer, [batch], device, bf16=True, loss_chunk_tokens=args.loss_chunk,
                          max_grad_norm=MAX_GRAD_NORM).loss  # fmt: skip

    return step


def build_baseline(model_dir: Path, device, args, lean: bool = False):
    """transformers + peft + bitsandbytes. `lean`: without `prepare_model_for_kbit_training` (its fp32 upcast of
    embeddings, norms and lm_head), checkpointing enabled directly; otherwise ("common") as the tutorials run it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device}
    )
    for module in model.modules():  # same CPU kernel as qlora-lite (no AVX512 repack at eval)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if lean:
        # as qlora-lite's enable_gradient_checkpointing: non-reentrant, so the adapters of a frozen base get their
        # gradients; the input grads hook is what reentrant checkpointing needs (transformers 5 adds it anyway)
        kwargs = {"use_reentrant": False}
        modern = getattr(model, "activation_checkpointing_enable", None)
        if modern is not None:
            modern(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    else:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    torch.manual_seed(args.seed)
    model = get_peft_model(  # freezes everything but the adapters
        model,
        LoraConfig(
            r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr)
    else:
        import bitsandbytes as bnb

        cls = (
            bnb.optim.PagedAdamW8bit
            if args.optimizer == "paged_adamw_8bit" and device.type == "cuda"
            else bnb.optim.AdamW8bit
        )
        optimizer = cls(params, lr=args.lr)

    def step(ids):
        # as transformers' Trainer(bf16=True, max_grad_norm=1.0) runs a step
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()  # .item() synchronises, so the step time is complete

    return step


def cpu_seconds(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def child(args) -> dict:
    """One side, in this fresh process: build, train `steps` steps, report speed, memory, CPU time and losses.

    `args.side`: "qlora", "qlora-compiled", "lean", "common" (or "baseline", the common one, as tools/gpu_suite.py
    names it)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.side in (OURS, COMPILED):
        build = build_qlora
    elif args.side in (*BASELINES, LEGACY_BASELINE):
        build = lambda *a: build_baseline(*a, lean=args.side == "lean")  # noqa: E731
    else:
        raise SystemExit(f"unknown side {args.side!r}")
    step = build(Path(args.model_dir), device, args)
    batches = [
        b.to(device)
        for b in make_batches(args.steps, args.micro_batch, args.seq_len, MODELS[args.model]["vocab_size"], args.seed)
    ]
    load_peak = peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    # every side under bf16 autocast with gradient clipping, as qlora-lite's trainer and Trainer(bf16=True) run
    losses, times, cpu = [], [], []
    for ids in batches:
        start, cpu_start = time.perf_counter(), cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
        losses.append(step(ids))  # a float: the step's device work is complete
        times.append(time.perf_counter() - start)
        cpu.append(cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - cpu_start)
    timed = times[args.warmup :] or times
    timed_cpu = cpu[args.warmup :] or cpu
    result = {
        "side": args.side,
        "tokens_per_s": args.micro_batch * args.seq_len / statistics.median(timed),
        "first_step_s": times[0],  # with --compile, the compiled side's includes tracing and compiling
        "step_s": statistics.median(timed),
        "losses": losses,
        "load_peak_rss": load_peak,
        "train_peak_rss": peak_rss(),
        # CPU seconds per wall second of the timed steps (all threads): what the side got of the machine
        "train_cpu_use": sum(timed_cpu) / sum(timed),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["max_allocated"] = torch.cuda.max_memory_allocated()
        result["max_reserved"] = torch.cuda.max_memory_reserved()
    return result


CHILD_KEYS = ("device", "model", "seq_len", "micro_batch", "steps", "warmup", "rank", "alpha", "lr", "optimizer", "seed",
              "loss_chunk", "checkpoint_every")  # fmt: skip


def run_side(side: str, model_dir: Path, args) -> dict:
    """One side in a fresh process; adds its process CPU time (getrusage of the child), wall time and the load
    average when it started."""
    cmd = [sys.executable, __file__, "--child", side, "--model-dir", str(model_dir)]
    for key in CHILD_KEYS:
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--offload"] if args.offload else []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as cache:
        if side == COMPILED:  # an empty inductor cache, so the first step pays the whole compile
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"side {side} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(process_cpu_s=cpu_seconds(after) - cpu_seconds(before), process_wall_s=wall, load_at_start=load)
    return result


# ----------------------------------------------------------------------------------- pure: order, ratios, report


def parse_baselines(text: str) -> list[str]:
    """The names in `--baselines` ("common,lean" -> ["lean", "common"]), in BASELINES' order (lean first: it is the
    headline); ValueError if none or an unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BASELINES))
    if unknown or not names:
        raise ValueError(f"--baselines takes a comma-separated subset of {','.join(BASELINES)}, not {text!r}")
    return [b for b in BASELINES if b in names]


def side_order(baselines: list[str], compile_: bool, repeat: int) -> list[str]:
    """The sides of one repeat: the first baseline, qlora-lite (and compiled), the other baseline; every odd repeat
    reversed (A B C, C B A, A B C, ...). qlora-lite runs next to the first (headline) baseline every time."""
    ours = [OURS, COMPILED] if compile_ else [OURS]
    order = [baselines[0], *ours, *baselines[1:]]
    return order[::-1] if repeat % 2 else order


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def pair_ratios(runs: list[dict], num: str, den: str, key: str, skip=frozenset()) -> list[float]:
    """Per repeat: `num`'s `key` over `den`'s in the same repeat (repeats where either lacks it, or either side's
    (repeat, side) is in `skip`, are left out)."""
    return [value for _, value in paired(runs, num, den, key, skip)]


def paired(runs: list[dict], num: str, den: str, key: str, skip=frozenset()) -> list[tuple[int, float]]:
    found: dict[int, dict[str, dict]] = {}
    for r in runs:
        found.setdefault(r["repeat"], {})[r["side"]] = r
    return [
        (repeat, sides[num][key] / sides[den][key])
        for repeat, sides in sorted(found.items())
        if num in sides and den in sides and key in sides[num] and key in sides[den] and sides[den][key]
        and (repeat, num) not in skip and (repeat, den) not in skip
    ]  # fmt: skip


MEDIAN_KEYS = ("tokens_per_s", "step_s", "first_step_s", "train_peak_rss", "load_peak_rss", "max_allocated",
               "max_reserved", "process_cpu_s", "process_wall_s", "train_cpu_use", "threads")  # fmt: skip


def memory_keys(device: str) -> list[str]:
    return ["max_reserved", "max_allocated", "train_peak_rss"] if device == "cuda" else ["train_peak_rss"]


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Cores busy (all processes) over the next `seconds`, from /proc/stat; None where there is none. Unlike the load
    average it is not an average over the last minute, so it does not count this benchmark's previous runs."""

    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # user..steal; idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return (total - (idle1 - idle0)) / total * (os.cpu_count() or 1) if total > 0 else None


def load_status(before: tuple, after: tuple, cores: int, threads: int | None = None, busy: float | None = None) -> dict:
    """Load averages around the run (1, 5, 15 minutes), the cores busy just before it, and the warnings they call for.
    The 1-minute average before the run also counts whatever ran in the minute before (an earlier benchmark too); the
    one after includes this benchmark's children (each keeps up to `threads` threads busy), so it warns only when it
    exceeds that by more than cores / 2."""
    threads = min(threads or cores, cores)
    warnings = []
    if before[0] > cores / 2:
        now = f" ({busy:.2f} cores busy just before it)" if busy is not None else ""
        warnings.append(
            f"load average {before[0]:.2f} before the run{now} > {cores} cores / 2: other processes shared the CPU "
            "in the last minute, so the ratios may be noisier than on a quiet machine"
        )
    if busy is not None and busy > cores / 2:
        warnings.append(f"{busy:.2f} cores were busy just before the run > {cores} cores / 2: other processes compete")
    if after[0] > threads + cores / 2:
        warnings.append(
            f"load average {after[0]:.2f} after the run > this benchmark's own {threads} + {cores} cores / 2: "
            "other processes competed during the run"
        )
    return {"before": list(before), "after": list(after), "busy_before": busy, "cores": cores, "warnings": warnings}


def starved_runs(runs: list[dict], cores: int, share: float = 0.75) -> list[dict]:
    """Runs whose timed steps got less than `share` of the cores their threads could use: something else ran then, and
    the ratios with that run are not the code's."""
    return [
        r
        for r in runs
        if "train_cpu_use" in r and "threads" in r and r["train_cpu_use"] < share * min(r["threads"], cores)
    ]


def starved(runs: list[dict], cores: int, share: float = 0.75) -> list[str]:
    """A warning for each of `starved_runs`."""
    return [
        f"repeat {r['repeat'] + 1} {LABELS.get(r['side'], r['side'])} kept only {r['train_cpu_use']:.2f} of "
        f"{min(r['threads'], cores)} cores busy in its steps: it competed with something, its ratios (*) are suspect"
        for r in starved_runs(runs, cores, share)
    ]


def build_report(runs: list[dict], settings: dict, load: dict, versions: dict) -> dict:
    """Everything the benchmark found, JSON-ready: settings, versions, load, the order of each repeat, per-side medians
    and the per-pair ratios (qlora-lite / each baseline; compiled / eager with --compile)."""
    sides = list(dict.fromkeys(r["side"] for r in runs))
    by_side = {s: [r for r in runs if r["side"] == s] for s in sides}
    medians = {}
    for side, rs in by_side.items():
        m = {k: statistics.median(r[k] for r in rs) for k in MEDIAN_KEYS if all(k in r for r in rs)}
        m["loss_first"] = statistics.median(r["losses"][0] for r in rs)
        m["loss_last"] = statistics.median(r["losses"][-1] for r in rs)
        m["runs"] = len(rs)
        medians[side] = m
    pairs = [(OURS, b) for b in settings["baselines"] if b in by_side and OURS in by_side]
    if COMPILED in by_side and OURS in by_side:
        pairs.append((COMPILED, OURS))
    # on CUDA one thread drives the device, so a side's busy cores say nothing about contention there
    starving = starved_runs(runs, load["cores"]) if settings["device"] == "cpu" else []
    suspect = {(r["repeat"], r["side"]) for r in starving}
    ratios = {}
    for num, den in pairs:
        entry = {}
        for key in ["tokens_per_s", *memory_keys(settings["device"])]:
            found = paired(runs, num, den, key)
            if not found:
                continue
            entry[key] = spread([v for _, v in found])
            entry[key]["repeats"] = [repeat for repeat, _ in found]
            starred = [repeat for repeat, _ in found if (repeat, num) in suspect or (repeat, den) in suspect]
            if starred:  # the same figures without the repeats where a side got too little of the CPU
                quiet = pair_ratios(runs, num, den, key, suspect)
                entry[key].update(suspect_repeats=starred, without_suspect=spread(quiet) if quiet else None)
        a, b = by_side[num][0]["losses"][0], by_side[den][0]["losses"][0]
        entry["first_step_loss_rel_diff"] = abs(a - b) / abs(b)
        ratios[f"{num}/{den}"] = entry
    orders = {}
    for r in runs:
        orders.setdefault(r["repeat"], []).append(r["side"])
    report = {
        "settings": settings,
        "versions": versions,
        "load": load,
        "warnings": load["warnings"] + (starved(runs, load["cores"]) if starving else []),
        "order": [orders[k] for k in sorted(orders)],
        "medians": medians,
        "ratios": ratios,
        "runs": runs,
    }
    if COMPILED in by_side and OURS in by_side:
        eager, compiled = medians[OURS], medians[COMPILED]
        compile_s = compiled["first_step_s"] - eager["first_step_s"]
        saved = eager["step_s"] - compiled["step_s"]
        report["compile"] = {
            "compile_s": compile_s,  # cold inductor cache
            "payback_steps": compile_s / saved if saved > 0 else None,
            "losses_equal_eager": all(a["losses"] == b["losses"] for a, b in zip(by_side[OURS], by_side[COMPILED])),
        }
    return report


def format_report(report: dict) -> list[str]:
    """The report as text lines: settings and load, then ratios (the lean one first), then per-side medians."""
    gib = 2**30
    s, load, ratios, medians = report["settings"], report["load"], report["ratios"], report["medians"]
    lines = [
        " ".join(f"{k}={v}" for k, v in s.items() if k != "baselines") + f" baselines={','.join(s['baselines'])}",
        " ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load['before'])}, after "
        f"{' '.join(f'{x:.2f}' for x in load['after'])} on {load['cores']} cores (after includes this benchmark's own)"
        + (f"; {load['busy_before']:.2f} cores busy just before" if load.get("busy_before") is not None else ""),
    ]
    if s.get("checkpoint_every", 1) > 1:
        lines.append(
            f"NOTE: qlora-lite recomputes only one layer in {s['checkpoint_every']} (train.checkpoint_every); the "
            "baselines recompute every layer: the ratios compare a speed-for-memory trade, not the same work"
        )
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    lines.append("order: " + "; ".join(" ".join(LABELS.get(x, x) for x in o) for o in report["order"]))
    labels = {"tokens_per_s": "tokens/s", "max_reserved": "peak reserved", "max_allocated": "peak allocated",
              "train_peak_rss": "peak RSS (train)"}  # fmt: skip
    lines.append("")
    lines.append("per-pair ratios (each repeat's figure over the same repeat's), median [min-max] (each repeat):")
    for pair, entry in ratios.items():
        num, den = pair.split("/")
        name = f"{LABELS.get(num, num)} / {LABELS.get(den, den)}"
        for key, label in labels.items():
            if key in entry:
                e = entry[key]
                starred = set(e.get("suspect_repeats", []))
                each = " ".join(f"{v:.3f}{'*' if r in starred else ''}" for r, v in zip(e["repeats"], e["values"]))
                line = f"  {name:<22}{label:<18}{e['median']:>7.3f} [{e['min']:.3f}-{e['max']:.3f}] ({each})"
                if e.get("without_suspect"):
                    q = e["without_suspect"]
                    line += f"; without *: {q['median']:.3f} [{q['min']:.3f}-{q['max']:.3f}]"
                lines.append(line)
        lines.append(f"  {name:<22}{'first-step loss':<18}relative difference {entry['first_step_loss_rel_diff']:.2e}")
    sides = list(medians)
    lines.append("")
    lines.append("medians per side:")
    lines.append(f"  {'metric':<26}" + "".join(f"{LABELS.get(x, x):>12}" for x in sides))
    rows = [("tokens_per_s", "tokens/s", 1, ".1f"), ("step_s", "step s", 1, ".3f")]
    if s["device"] == "cuda":
        rows += [("max_allocated", "peak allocated GiB", gib, ".3f"), ("max_reserved", "peak reserved GiB", gib, ".3f")]
    rows += [
        ("train_peak_rss", "peak RSS (train) GiB", gib, ".3f"),
        ("load_peak_rss", "peak RSS (load) GiB", gib, ".3f"),
        ("process_cpu_s", "process CPU s", 1, ".1f"),
        ("process_wall_s", "process wall s", 1, ".1f"),
        ("train_cpu_use", "cores busy in steps", 1, ".2f"),
        ("loss_first", "loss after step 1", 1, ".4f"),
        ("loss_last", f"loss after step {s['steps']}", 1, ".4f"),
    ]
    for key, label, scale, fmt in rows:
        if all(key in medians[x] for x in sides):
            lines.append(f"  {label:<26}" + "".join(f"{medians[x][key] / scale:>12{fmt}}" for x in sides))
    if "compile" in report:
        c, eager, compiled = report["compile"], medians[OURS], medians[COMPILED]
        lines.append("")
        lines.append(f"compiled losses equal the eager ones, every step: {c['losses_equal_eager']}")
        lines.append(
            f"first step s: eager {eager['first_step_s']:.2f}, compiled {compiled['first_step_s']:.2f}; "
            f"compile time ~{c['compile_s']:.1f} s (cold inductor cache)"
        )
        steady = f"steady step s: eager {eager['step_s']:.3f}, compiled {compiled['step_s']:.3f}; "
        if c["payback_steps"] is not None:
            lines.append(steady + f"the compile pays after ~{c['payback_steps']:.0f} steps")
        else:
            lines.append(steady + "compiled is not faster here, so it never pays")
    return lines


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("qlora-lite", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    try:
        found["commit"] = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        found["commit"] = None
    return found


def build_parser() -> argparse.ArgumentParser:
    """The command line, and with it the benchmark's defaults (tools/profile_step.py builds its sides from them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, choices=sorted(MODELS))
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--optimizer", default="adamw_8bit", choices=["paged_adamw_8bit", "adamw_8bit", "adamw"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--loss-chunk", type=int, default=128, help="qlora-lite's train.loss_chunk_tokens (0: full logits)"
    )
    parser.add_argument("--offload", action="store_true", help="qlora-lite's train.offload_activations")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="qlora-lite's train.checkpoint_every: recompute only every k-th layer (the baselines recompute every "
        "layer, as transformers does); the ratios then compare a speed-for-memory trade, said in the header",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also run qlora-lite with train.compile, against eager in the same run"
    )
    parser.add_argument(
        "--baselines",
        default="lean,common",
        help="which transformers + peft + bitsandbytes sides to run: lean (no prepare_model_for_kbit_training), "
        "common (with it); default both",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line on stdout (the text goes to stderr)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    args.model = args.model or ("llama-1b-128k" if args.device == "cuda" else "llama-small")
    args.seq_len = args.seq_len or (2048 if args.device == "cuda" else 256)
    if args.child:
        args.side = args.child
        print(json.dumps(child(args)))
        return
    try:
        args.baselines = parse_baselines(args.baselines)
    except ValueError as e:
        parser.error(str(e))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    cores = os.cpu_count() or 1
    load_before, busy = os.getloadavg(), cpu_busy()
    for warning in load_status(load_before, (0.0, 0.0, 0.0), cores, busy=busy)["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp), args.model, args.seq_len)
        for repeat in range(args.repeats):
            for side in side_order(args.baselines, args.compile, repeat):
                runs.append({"repeat": repeat, **run_side(side, model_dir, args)})
                r = runs[-1]
                print(
                    f"  repeat {repeat + 1} {LABELS[side]:<11} {r['tokens_per_s']:.1f} tokens/s, losses "
                    f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, process CPU {r['process_cpu_s']:.1f} s, "
                    f"load {r['load_at_start']:.2f}",
                    file=sys.stderr,
                )
    threads = max((r.get("threads", 0) for r in runs), default=0)
    load = load_status(load_before, os.getloadavg(), cores, threads, busy)
    settings = {k: getattr(args, k) for k in (*CHILD_KEYS, "repeats", "offload", "compile", "baselines")}
    report = build_report(runs, settings, load, versions())
    text = "\n".join(format_report(report))
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report), flush=True)
    else:
        print(text)


if __name__ == "__main__":
    main()
