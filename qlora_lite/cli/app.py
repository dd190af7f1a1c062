"""`qlora-lite` command line: train, export, memory, demo.

Each sub-command parses its arguments, calls the library, and renders the result with rich.
A `QloraLiteError` becomes one line on stderr and exit code 2 (a traceback only with --debug). SIGTERM and
Ctrl-C (SIGINT) stop a command through its own cleanup and print one line (for `train`: what was saved and how
to resume), with exit code 143 or 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

from ..errors import QloraLiteError
from .common import console as _console


def _quiet_libraries() -> None:
    """Keep third-party chatter (load bars, bitsandbytes notices) out of our output."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", category=UserWarning)
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------ main
COMMANDS = ("train", "data", "export", "memory", "chat", "generate", "demo", "doctor")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as one-line `UsageError`s (argparse prints usage and exits by itself)."""

    def error(self, message: str):
        import difflib
        import re

        from ..errors import UsageError

        choices = ", ".join(COMMANDS)
        bad = re.match(r"argument \{[^}]*\}: invalid choice: '([^']*)'", message)
        if bad:
            close = difflib.get_close_matches(bad.group(1), COMMANDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown command {bad.group(1)!r}{hint}; choose one of {choices}.")
        if message.startswith("the following arguments are required: {"):
            raise UsageError(f"no command given; run `{self.prog} COMMAND` with COMMAND one of {choices} (see --help).")
        raise UsageError(f"{message}; see `{self.prog} --help`.")


def build_parser() -> argparse.ArgumentParser:
    """The `qlora-lite` argument parser with every sub-command."""
    parser = _Parser(prog="qlora-lite", description="QLoRA fine-tuning on one constrained GPU.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    from . import chat, data, demo, doctor, export, generate, memory, train

    for add in (
        train.add_parser,
        data.add_parser,
        export.add_parser,
        memory.add_parser,
        chat.add_parser,
        generate.add_parser,
        demo.add_parser,
        doctor.add_parser,
    ):
        add(sub)
    return parser


def _split_overrides(extra: list[str]) -> dict[str, str]:
    """Turn ['--lora.r', '8', '--train.lr=1e-4'] into {'lora.r': '8', 'train.lr': '1e-4'}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) == 2:
            raise QloraLiteError(f"unexpected argument {token!r}; overrides look like --section.key value.")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            i += 1
            value = extra[i]
        else:
            raise QloraLiteError(f"override {token} has no value; write {token} VALUE.")
        overrides[key] = value
        i += 1
    return overrides


def _print_error(exc: BaseException | str) -> None:
    """`error: <message>` as one line on stderr (message text is not read as rich markup), plus the memory
    advice of an out-of-memory error."""
    from rich.text import Text

    from ..errors import OutOfMemoryError

    console = _console(stderr=True)
    console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), soft_wrap=True)
    if isinstance(exc, OutOfMemoryError) and exc.advice is not None:
        for line in exc.advice.lines():
            console.print(Text(line), soft_wrap=True)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGINT raise `training.interrupt.Interrupted` (a `KeyboardInterrupt`) in
    the main thread, so it stops through its own cleanup (atomic writes remove their temporaries, locks are
    released); a second signal while it unwinds ends the process at once. A signal the parent process set to
    be ignored stays ignored. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from ..training.interrupt import Interrupted

    def stop(signum: int, frame: object) -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_DFL)
        raise Interrupted(signum=signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if current is not None and current is not signal.SIG_IGN:
            previous[sig] = current
    for sig in previous:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `qlora-lite` and `python -m qlora_lite`; returns the exit code."""
    with _signals_interrupt():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    """Run one command; errors and interruptions become one line on stderr and the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        extra = [e for e in extra if e != "--debug"]
        _quiet_libraries()
        handler: Callable = args.handler
        if extra and not getattr(args, "accepts_overrides", False):
            from ..errors import UsageError

            raise UsageError(f"unrecognized arguments: {' '.join(extra)}; see `qlora-lite {args.command} --help`.")
        return int(handler(args, _split_overrides(extra)) or 0)
    except QloraLiteError as exc:
        if debug:
            raise
        if not getattr(exc, "mirrored", False):  # another torchrun rank's failure, which that rank prints
            _print_error(exc)
        return exc.exit_code
    except OSError as exc:  # the file system refused a read or write the input checks could not foresee
        if debug:
            raise
        _print_error(f"{exc}; check that path, its permissions and the free disk space.")
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM; `train` says where it stopped and how to resume
        if debug:
            raise
        from rich.text import Text

        from ..training.interrupt import signal_of

        _console(stderr=True).print(Text(str(exc) or "interrupted"), soft_wrap=True)
        return 128 + signal_of(exc)


if __name__ == "__main__":
    sys.exit(main())
