"""Side-by-side training benchmark: qlora-lite vs transformers + peft + bitsandbytes.

Same model config, random weights, data, seed, rank, alpha, targets, sequence length, micro-batch,
gradient checkpointing and optimizer, run both ways in fresh processes that alternate (A B A B).
Prints median tokens/s, peak memory (CUDA: max allocated / reserved; CPU: peak RSS of the training phase),
the loss after the first step and after N steps, and the ratios qlora-lite / baseline.

`--compile` adds a third side, qlora-lite with `train.compile` (its decoder layers compiled regionally), run in the
same alternation as eager qlora-lite, and prints the compiled / eager ratios and the compile time: the compiled
first step minus the eager first step (each compiled process starts from an empty inductor cache, so this is what
a run pays the first time), and the steps it takes to earn it back.

    python tools/bench.py --device cpu                      # small Llama-shaped model, seq 256
    python tools/bench.py --device cpu --compile            # the same, plus qlora-lite compiled
    python tools/bench.py --device cuda --model llama-1b-128k --seq-len 2048 --micro-batch 1

Not a test: benchmarks print ratios; they do not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPILED = "qlora-compiled"  # the side with train.compile
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
    enable_gradient_checkpointing(model, offload=args.offload)
    if args.side == COMPILED:
        compile_decoder_layers(model)  # where prepare_run calls it: after checkpointing, before the optimizer
    model.train()
    optimizer = AdapterOptimizer(model.parameters(), args.optimizer, lr=args.lr)

    def step(ids):
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        return train_step(model, optimizer, [batch], device, bf16=True, loss_chunk_tokens=args.loss_chunk,
                          max_grad_norm=MAX_GRAD_NORM).loss  # fmt: skip

    return step


def build_baseline(model_dir: Path, device, args):
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
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    torch.manual_seed(args.seed)
    model = get_peft_model(
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


def child(args) -> dict:
    """One side, in this fresh process: build, train `steps` steps, report speed, memory and losses."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    build = build_baseline if args.side == "baseline" else build_qlora
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
    # both sides under bf16 autocast with gradient clipping, as qlora-lite's trainer and Trainer(bf16=True) run
    losses, times = [], []
    for ids in batches:
        start = time.perf_counter()
        losses.append(step(ids))  # a float: the step's device work is complete
        times.append(time.perf_counter() - start)
    timed = times[args.warmup :] or times
    result = {
        "side": args.side,
        "tokens_per_s": args.micro_batch * args.seq_len / statistics.median(timed),
        "first_step_s": times[0],  # with --compile, the compiled side's includes tracing and compiling
        "step_s": statistics.median(timed),
        "losses": losses,
        "load_peak_rss": load_peak,
        "train_peak_rss": peak_rss(),
    }
    if device.type == "cuda":
        result["max_allocated"] = torch.cuda.max_memory_allocated()
        result["max_reserved"] = torch.cuda.max_memory_reserved()
    return result


def run_side(side: str, model_dir: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model-dir", str(model_dir)]
    for key in (
        "device",
        "model",
        "seq_len",
        "micro_batch",
        "steps",
        "warmup",
        "rank",
        "alpha",
        "lr",
        "optimizer",
        "seed",
        "loss_chunk",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--offload"] if args.offload else []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as cache:
        if side == COMPILED:  # an empty inductor cache, so the first step pays the whole compile
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], args) -> None:
    """Print medians per side and the qlora-lite / baseline ratios (with --compile: the compiled side too, its
    compiled / eager ratios, its compile time and the steps that earn it back)."""
    gib = 2**30
    sides = ["qlora", COMPILED, "baseline"] if args.compile else ["qlora", "baseline"]
    by_side = {side: [r for r in runs if r["side"] == side] for side in sides}

    def med(side, key):
        return statistics.median(r[key] for r in by_side[side])

    keys = [("tokens_per_s", "tokens/s", 1)]
    if args.device == "cuda":
        keys += [("max_allocated", "peak allocated GiB", gib), ("max_reserved", "peak reserved GiB", gib)]
    keys += [("train_peak_rss", "peak RSS (train) GiB", gib), ("load_peak_rss", "peak RSS (load) GiB", gib)]
    print(
        f"device={args.device} model={args.model} seq={args.seq_len} micro_batch={args.micro_batch} steps={args.steps} "
        f"rank={args.rank} optimizer={args.optimizer} repeats={args.repeats} loss_chunk={args.loss_chunk} offload={args.offload}"
    )
    compiled = [f"{'compiled':>14}"] if args.compile else []
    vs_eager = [f"{'compiled/eager':>16}"] if args.compile else []
    print(f"{'metric':<24}{'qlora-lite':>14}{''.join(compiled)}{'baseline':>14}{'ratio':>10}{''.join(vs_eager)}")

    def row(label, values, fmt):
        eager, base = values["qlora"], values["baseline"]
        line = f"{label:<24}{eager:>14{fmt}}"
        if args.compile:
            line += f"{values[COMPILED]:>14{fmt}}"
        line += f"{base:>14{fmt}}{eager / base:>10{fmt}}"
        if args.compile:
            line += f"{values[COMPILED] / eager:>16{fmt}}"
        print(line)

    for key, label, scale in keys:
        row(label, {side: med(side, key) / scale for side in sides}, ".3f")
    for step_index, label in ((0, "loss after step 1"), (-1, f"loss after step {args.steps}")):
        row(label, {side: statistics.median(r["losses"][step_index] for r in by_side[side]) for side in sides}, ".4f")
    first = {side: by_side[side][0]["losses"][0] for side in sides}
    print(f"first-step loss relative difference: {abs(first['qlora'] - first['baseline']) / first['baseline']:.2e}")
    if not args.compile:
        return
    print(
        f"first-step loss relative difference, compiled vs eager: {abs(first[COMPILED] - first['qlora']) / first['qlora']:.2e}"
    )
    same = all(a["losses"] == b["losses"] for a, b in zip(by_side["qlora"], by_side[COMPILED]))
    print(f"compiled losses equal the eager ones, every step: {same}")
    first_eager, first_compiled = med("qlora", "first_step_s"), med(COMPILED, "first_step_s")
    compile_s = first_compiled - first_eager
    print(
        f"first step s: eager {first_eager:.2f}, compiled {first_compiled:.2f}; compile time ~{compile_s:.1f} s (cold inductor cache)"
    )
    saved = med("qlora", "step_s") - med(COMPILED, "step_s")
    if saved > 0:
        print(
            f"steady step s: eager {med('qlora', 'step_s'):.3f}, compiled {med(COMPILED, 'step_s'):.3f}; the compile pays after ~{compile_s / saved:.0f} steps"
        )
    else:
        print(
            f"steady step s: eager {med('qlora', 'step_s'):.3f}, compiled {med(COMPILED, 'step_s'):.3f}; compiled is not faster here, so it never pays"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, choices=sorted(MODELS))
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
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
        "--compile", action="store_true", help="also run qlora-lite with train.compile, against eager in the same run"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("llama-1b-128k" if args.device == "cuda" else "llama-small")
    args.seq_len = args.seq_len or (2048 if args.device == "cuda" else 256)
    if args.child:
        args.side = args.child
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp), args.model, args.seq_len)
        runs = []
        for _ in range(args.repeats):
            for side in ("qlora", COMPILED, "baseline") if args.compile else ("qlora", "baseline"):
                runs.append(run_side(side, model_dir, args))
                print(
                    f"  {side:<14} {runs[-1]['tokens_per_s']:.1f} tokens/s, losses {runs[-1]['losses'][0]:.4f} -> {runs[-1]['losses'][-1]:.4f}",
                    file=sys.stderr,
                )
    summarize(runs, args)


if __name__ == "__main__":
    main()
