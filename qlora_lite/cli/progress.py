"""The rich progress display and run summary, re-exported for the CLI; they live in `training/progress` so that
`qlora_lite.train()` can show the same display from Python."""

from __future__ import annotations

from ..training.progress import RichReporter, summary_table

__all__ = ["RichReporter", "summary_table"]
