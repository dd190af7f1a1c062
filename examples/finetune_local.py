"""Fine-tune a local Hugging Face model directory on a JSONL instruction file with 4-bit QLoRA on one GPU.

    python examples/finetune_local.py --model /models/Qwen2.5-1.5B-Instruct --data examples/instructions.jsonl \
        --out runs/qwen-instruct [--train.max_steps 500 --lora.r 32 ...] [--resume] [--force]

It reads examples/qlora_instruct.yaml, applies the overrides, prints the memory report for this GPU first
(and stops when the run would not fit, unless --force), trains with a progress bar, and prints where the
PEFT-format adapter is. Load the result with peft, or merge it with `qlora-lite export`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console

import qlora_lite
from qlora_lite.config.load import load_config
from qlora_lite.errors import QloraLiteError
from qlora_lite.training.progress import RichReporter, summary_table

HERE = Path(__file__).resolve().parent


def memory_check(config, console: Console, force: bool) -> None:
    """Predict peak GPU memory for this config (as `qlora-lite memory CONFIG.yaml` does) and compare it with the GPU."""
    report = qlora_lite.estimate_memory(config)  # the config's own settings, on CUDA
    console.print(f"memory report for {config.model}: predicted peak {report.total / 2**30:.2f} GiB")
    for name, size in report.components.items():
        console.print(f"  {name:<28} {size / 2**30:8.3f} GiB")
    if torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(0).total_memory
        if not report.fits(budget):
            message = (
                f"the run needs about {report.total / 2**30:.1f} GiB but the GPU has {budget / 2**30:.1f} GiB; "
                f"see `qlora-lite memory CONFIG.yaml --gpu-memory {budget / 2**30:.1f}GiB` for what to change"
            )
            if not force:
                raise SystemExit(message + ", or pass --force.")
            console.print(f"[yellow]warning:[/] {message}.")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument(
        "--data", required=True, help="JSONL instruction file (messages, prompt/completion or text records)"
    )
    parser.add_argument("--out", default="runs/qlora-instruct", help="run directory")
    parser.add_argument("--config", default=str(HERE / "qlora_instruct.yaml"), help="base YAML config")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--force", action="store_true", help="train even when the memory report says it will not fit")
    args, extra = parser.parse_known_args(argv)
    if len(extra) % 2 or any(not k.startswith("--") for k in extra[::2]):
        parser.error("extra arguments must be pairs such as --train.max_steps 500")
    overrides = {k[2:]: v for k, v in zip(extra[::2], extra[1::2])}
    overrides.update({"model": args.model, "data.train": args.data, "output_dir": args.out})
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(highlight=False)
    try:
        config = load_config(args.config, overrides)
        memory_check(config, console, args.force)
        reporter = RichReporter(console, title="QLoRA")
        try:
            result = qlora_lite.train(config, resume=args.resume, reporter=reporter)
        finally:
            reporter.close()
    except QloraLiteError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2
    console.print(summary_table(result))
    console.print(
        f"adapter: {result.adapter_dir}\n"
        f"merge it: qlora-lite export --base {config.model} --adapter {result.adapter_dir} --out {result.output_dir / 'merged'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
