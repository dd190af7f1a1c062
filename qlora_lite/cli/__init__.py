"""The `qlora-lite` command line: one module per sub-command, `main` in `cli.main`."""

from .main import main

__all__ = ["main"]
