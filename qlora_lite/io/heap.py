"""Giving freed heap pages back to the OS, so streamed loads and exports keep a flat resident size."""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim, or a no-op elsewhere.

    Freed bf16 temporaries sit between long-lived packed weights in glibc's heap; without handing those
    pages back, resident memory grows by several times the largest tensor while loading.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None
