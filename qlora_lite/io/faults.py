"""Fault points for the crash tests: SIGKILL or an injected full disk at named moments of our own code."""

from __future__ import annotations

import errno
import os
import signal

# Fault injection for the crash tests: "<point>:<N>" SIGKILLs the process at that point (KILL_ENV) or fails
# there as a full disk would, with OSError(ENOSPC) (ENOSPC_ENV). Points: in-checkpoint:STEP,
# after-checkpoint:STEP, in-final-adapter:STEP (train.py), in-export:TENSORS_WRITTEN (export.py).
KILL_ENV = "QLORA_LITE_TEST_KILL"
ENOSPC_ENV = "QLORA_LITE_TEST_ENOSPC"


def fault_point(point: str, count: int) -> None:
    """Crash here (SIGKILL) or fail with ENOSPC when the test environment asks for `point:count`; else nothing."""
    here = f"{point}:{count}"
    if os.environ.get(KILL_ENV) == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(ENOSPC_ENV) == here:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {here})")
