"""`qlora-lite doctor`'s run: the checks in order (`CHECKS`), each isolated (a check that raises becomes its fail
line), the verdict and the exit code."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .checks import (
    FAIL,
    SKIP,
    WARN,
    Check,
    GiB,
    _Context,
    _first_line,
    _Skip,
    check_attention,
    check_bf16,
    check_bitsandbytes,
    check_driver,
    check_gpu,
    check_kernel,
    check_memory,
    check_peft,
    check_presets,
    check_torch,
    check_transformers,
)
from .probes import Probes

CHECKS: list[tuple[str, Callable[[_Context], Check]]] = [
    ("torch", check_torch),
    ("transformers", check_transformers),
    ("bitsandbytes", check_bitsandbytes),
    ("peft", check_peft),
    ("gpu", check_gpu),
    ("driver", check_driver),
    ("kernel", check_kernel),
    ("bf16", check_bf16),
    ("attention", check_attention),
    ("memory", check_memory),
    ("presets", check_presets),
]


@dataclass
class DoctorReport:
    """The checks, the verdict and the exit code (0: ready, GPU or CPU-only; 1: a check failed)."""

    checks: list[Check]
    verdict: str
    ready: bool
    device: str | None
    largest_preset: str | None
    fitting_presets: list[str]
    seconds: float

    @property
    def exit_code(self) -> int:
        return 0 if self.ready else 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: checks (name, status, finding, fix, data, seconds), verdict, ready, exit_code, ..."""
        return {
            "checks": [asdict(c) for c in self.checks],
            "verdict": self.verdict,
            "ready": self.ready,
            "exit_code": self.exit_code,
            "device": self.device,
            "fitting_presets": self.fitting_presets,
            "largest_preset": self.largest_preset,
            "seconds": round(self.seconds, 3),
        }


def _run_one(ctx: _Context, name: str, check: Callable[[_Context], Check]) -> Check:
    start = time.perf_counter()
    try:
        # a library printing at import must not break --json's one object (C-level output is not caught)
        with contextlib.redirect_stdout(io.StringIO()):
            result = check(ctx)
    except _Skip as skip:
        result = Check(name, SKIP, str(skip))
    except Exception as exc:
        result = Check(
            name,
            FAIL,
            f"the check itself failed: {_first_line(exc)}",
            "an unusual install or a bug in qlora-lite's doctor; please report this line",
        )
    result.seconds = time.perf_counter() - start
    return result


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def verdict_of(checks: list[Check], facts: dict[str, Any]) -> tuple[str, bool]:
    """(the verdict line, whether the machine is ready to train)."""
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        return f"not ready: {_plural(len(failed), 'problem')} ({', '.join(failed)})", False
    device = facts.get("device")
    warned = [c for c in checks if c.status == WARN and not (device == "cpu" and c.name == "gpu")]
    more = f" ({_plural(len(warned), 'warning')} above)" if warned else ""
    if device != "cuda":
        return f"can train on the CPU only (slow){more}", True
    where = f"ready to train on {facts['gpu_name']} ({facts['gpu_total'] / GiB:.0f} GiB)"
    fitting = facts.get("presets_fitting")
    if fitting:
        return f"{where}: fits up to {fitting[-1]} at default settings{more}", True
    if fitting is not None:
        return f"{where}, but no preset fits in its free memory at default settings{more}", True
    return f"{where}{more}", True


def run_doctor(probes: Probes | None = None) -> DoctorReport:
    """Run every check in order (each isolated) and decide the verdict."""
    start = time.perf_counter()
    ctx = _Context(probes or Probes())
    checks = [_run_one(ctx, name, check) for name, check in CHECKS]
    verdict, ready = verdict_of(checks, ctx.facts)
    fitting = ctx.facts.get("presets_fitting") or []
    return DoctorReport(
        checks=checks,
        verdict=verdict,
        ready=ready,
        device=ctx.facts.get("device"),
        largest_preset=fitting[-1] if fitting else None,
        fitting_presets=list(fitting),
        seconds=time.perf_counter() - start,
    )
