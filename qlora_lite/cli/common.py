"""What every sub-command shares: the rich console."""

from __future__ import annotations


def console(stderr: bool = False):
    """A rich console that does not colour numbers and paths on its own."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)
