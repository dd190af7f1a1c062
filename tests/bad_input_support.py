"""What the bad-input cases share: a `Workspace` with good inputs to break, the `Case` record, and `DROP`.

Cases live in `tests/test_bad_input.py` (`CASES`) and in `tests/bad_cases_*.py` (each an own `CASES` list,
appended by test_bad_input.py), so that several areas can add cases without editing one list.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DROP = object()  # a config value that removes the key


class Workspace:
    """One case's folder: `model/` and `adapter/` (links to good ones), `train.jsonl`, and helpers to break them."""

    def __init__(self, root: Path, model: Path, adapter: Path, narrow_adapter: Path):
        self.root = root
        self.model = root / "model"
        self.model.symlink_to(model, target_is_directory=True)
        self.adapter = root / "adapter"
        self.adapter.symlink_to(adapter, target_is_directory=True)
        self.narrow_adapter = narrow_adapter
        self.data = self.write("train.jsonl", '{"text": "hello world"}\n{"prompt": "2+2=", "completion": "4"}\n')
        self.changed: list[str] = []  # what the case changed in the good config, for the docs table
        self._real = {
            str(model): "./model",
            str(adapter): "./adapter",
            str(narrow_adapter): "./narrow-adapter",
            str(root): ".",
        }

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def jsonl(self, name: str, *lines: Any) -> Path:
        """A data file with one line per item: a str is written as is, anything else as JSON."""
        return self.write(name, "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))

    def config(self, name: str = "run.yaml", **changes: Any) -> Path:
        """A good training config with dotted keys changed (`train__lr` for train.lr) or removed (DROP)."""
        data: dict = {
            "model": str(self.model),
            "output_dir": str(self.root / "run"),
            "lora": {"r": 4, "alpha": 8},
            "data": {"train": str(self.data), "max_seq_len": 32},
            "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum": 1, "optimizer": "adamw", "eval_every": 0},
        }
        for key, value in changes.items():
            dotted = key.replace("__", ".")
            if value is DROP:
                self.changed.append(f"{dotted}: (removed)")
            else:
                plain = isinstance(value, (int, float)) and not isinstance(value, bool)
                self.changed.append(f"{dotted}: {value if plain else self.relative(json.dumps(value))}")
            *sections, last = key.split("__")
            node = data
            for section in sections:
                node = node.setdefault(section, {})
            if value is DROP:
                node.pop(last, None)
            else:
                node[last] = value
        return self.write(name, yaml.safe_dump(data))

    def model_copy(self, name: str, without: tuple[str, ...] = ()) -> Path:
        """A real copy of the good model dir, to break."""
        dst = self.root / name
        shutil.copytree(self.model.resolve(), dst)
        for item in without:
            (dst / item).unlink()
        return dst

    def model_config(self, name: str, **changes: Any) -> Path:
        """A model copy whose config.json has keys changed."""
        dst = self.model_copy(name)
        config = json.loads((dst / "config.json").read_text())
        config.update(changes)
        (dst / "config.json").write_text(json.dumps(config))
        return dst

    def adapter_copy(self, name: str) -> Path:
        dst = self.root / name
        shutil.copytree(self.adapter.resolve(), dst)
        return dst

    def train(self, *extra: str, **changes: Any) -> list[str]:
        return ["train", str(self.config(**changes)), *extra]

    def export(self, adapter: Path | None = None, base: Path | None = None, *extra: str) -> list[str]:
        return [
            "export",
            "--base",
            str(base or self.model),
            "--adapter",
            str(adapter or self.adapter),
            "--out",
            str(self.root / "merged"),
            *extra,
        ]

    def relative(self, text: str) -> str:
        """Text with this workspace's absolute paths written relative to it."""
        for absolute, short in sorted(self._real.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(absolute, short)
        return text


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, in words
    build: Callable[[Workspace], list[str]]  # makes the input in the workspace and returns the argv
    fragment: str  # must appear in the message (paths relative to the workspace)
