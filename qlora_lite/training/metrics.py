"""metrics.jsonl: the run's log, one JSON object per logged step or eval."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import write_text_atomic


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended with one write per line.

    A kill can leave a torn last line; `truncate_to(step)` (run on resume) rewrites the file atomically
    with only the complete lines up to the checkpoint's step, so a resumed log equals an uninterrupted one.
    """

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        """Every complete line as a dict."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

    def truncate_to(self, step: int) -> None:
        """Keep only lines with `step` <= the given step."""
        rows = [r for r in self.read() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def append(self, record: dict) -> None:
        """Add one line."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
