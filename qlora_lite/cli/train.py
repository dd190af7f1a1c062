"""`qlora-lite train CONFIG.yaml [--section.key value ...] [--resume [--allow-data-change]]`: fine-tune with a
progress display."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import console


def add_parser(sub: Any) -> None:
    """Register `train` and its flags (every config key also as --section.key)."""
    from ..config.settings import field_help

    keys = "\n".join(f"  --{key} (default {default}): {help_}" for key, default, help_ in field_help())
    p = sub.add_parser(
        "train",
        help="fine-tune with QLoRA from a YAML config",
        description="Fine-tune with QLoRA. Every config key can be overridden as --section.key value.",
        epilog="config keys:\n" + keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML training config")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: continue even though data.train / data.eval changed since the checkpoint",
    )
    p.set_defaults(handler=run, accepts_overrides=True)


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """Train from the YAML config with the overrides; print the summary."""
    from ..config.load import load_config
    from ..training.loop import train
    from ..training.progress import RichReporter, summary_table

    config = load_config(args.config, overrides)
    if os.environ.get("RANK", "0") not in ("", "0"):  # a torchrun rank other than 0: rank 0 shows the run
        train(config, resume=args.resume, progress=False, allow_data_change=args.allow_data_change)
        return 0
    out = console()
    reporter = RichReporter(out, title="train")
    try:
        result = train(config, resume=args.resume, reporter=reporter, allow_data_change=args.allow_data_change)
    finally:
        reporter.close()
    out.print(summary_table(result))
    return 0
