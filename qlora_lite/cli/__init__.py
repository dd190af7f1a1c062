"""The `qlora-lite` command line: `app` holds the parser and `main`, one module per sub-command."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
