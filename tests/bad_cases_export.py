"""Bad-input cases for adapters and exports; appended to `tests/test_bad_input.py`'s table (see bad_input_support)."""

from __future__ import annotations

from .bad_input_support import Case

CASES: list[Case] = []
