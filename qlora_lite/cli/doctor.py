"""`qlora-lite doctor`: check this machine (the checks are `qlora_lite.doctor.checks`), one line each, a verdict."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import console

STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def add_parser(sub: Any) -> None:
    """Register `doctor` and its flags."""
    p = sub.add_parser(
        "doctor",
        help="check this machine: GPU, driver, bitsandbytes' 4-bit kernels, bf16, attention, free memory, versions, "
        "the presets that fit",
        description="Check in seconds whether this machine is ready to train: the GPU (name, compute capability, "
        "memory), the NVIDIA driver and torch's CUDA, bitsandbytes and a small 4-bit NF4 matmul on the device against "
        "an fp32 reference, bf16, the attention implementations, free memory, the package versions, and which presets "
        "fit at `qlora-lite train`'s default settings. One line per check (ok / warn / fail / skip) with the fix for "
        "each warning and failure, then a verdict. Exit code 0 when ready (a CPU-only machine counts, with a "
        "warning), 1 when a check failed.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts (checks and verdict)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, extra: dict[str, Any], probes: Any = None) -> int:
    """Run the checks and print them; the exit code is the report's (`probes` replaces the machine in tests)."""
    from rich.text import Text

    from ..doctor.report import run_doctor

    report = run_doctor(probes)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return report.exit_code
    out = console()
    width = max(len(c.name) for c in report.checks)
    for check in report.checks:
        line = Text.assemble(
            (f"{check.status:<4}", STYLES.get(check.status, "")), "  ", (f"{check.name:<{width}}", "bold"), "  "
        )
        line.append(check.finding)
        if check.fix:
            line.append("; fix: ")
            line.append(check.fix, "cyan")
        out.print(line, soft_wrap=True)
    out.print(Text(f"checked in {report.seconds:.1f} s", "dim"))
    style = "bold green" if report.ready else "bold red"
    out.print(Text.assemble(("verdict: ", "bold"), (report.verdict, style)), soft_wrap=True)
    return report.exit_code
