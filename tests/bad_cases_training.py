"""Bad-input cases for training runs: data, resume, run directories, signals; appended to `tests/test_bad_input.py`'s table (see bad_input_support)."""

from __future__ import annotations

from .bad_input_support import Case

CASES: list[Case] = []
