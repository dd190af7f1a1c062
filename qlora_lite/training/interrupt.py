"""How a run stops on SIGTERM or Ctrl-C: `Interrupted`, a `KeyboardInterrupt` that carries the signal and says
what was saved and how to continue.

The command line turns SIGTERM into `Interrupted` (Python turns SIGINT into `KeyboardInterrupt` by itself);
`training.loop.train` re-raises either as an `Interrupted` whose message names the newest complete checkpoint.
It stays a `KeyboardInterrupt`, so `except Exception` in a caller's code never swallows a Ctrl-C. Nothing
half-written is left behind: every file is written under a temporary name that is deleted when the write is
interrupted (`io/atomic`). No torch here: the CLI imports this module before knowing the sub-command.
"""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; `signum` is SIGTERM or SIGINT and `exit_code` is 128 + signum (143 or 130)."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.message = message
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal."""
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message or f"interrupted by {signal.Signals(self.signum).name}"


def signal_of(exc: BaseException) -> int:
    """The signal behind a `KeyboardInterrupt`: its own for `Interrupted`, else SIGINT (Ctrl-C)."""
    return getattr(exc, "signum", signal.SIGINT)
