"""Fault points for the crash tests: SIGKILL or an injected full disk at named moments of our own code."""

from __future__ import annotations

import errno
import os
import signal

# Fault injection for the crash tests: "<point>:<N>" SIGKILLs the process at that point (KILL_ENV) or fails
# there as a full disk would, with OSError(ENOSPC) (ENOSPC_ENV). Points: in-checkpoint:STEP,
# after-checkpoint:STEP, in-final-adapter:STEP (train.py), in-export:TENSORS_WRITTEN (export.py).
# Under torchrun, KILL_RANK_ENV limits the SIGKILL to the rank it names.
KILL_ENV = "QLORA_LITE_TEST_KILL"
KILL_RANK_ENV = "QLORA_LITE_TEST_KILL_RANK"
ENOSPC_ENV = "QLORA_LITE_TEST_ENOSPC"


def fault_point(point: str, count: int) -> None:
    """Crash here (SIGKILL) or fail with ENOSPC when the test environment asks for `point:count`; else nothing."""
    here = f"{point}:{count}"
    rank = os.environ.get(KILL_RANK_ENV)
    if os.environ.get(KILL_ENV) == here and (rank is None or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(ENOSPC_ENV) == here:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {here})")
