"""`import qlora_lite` and `qlora-lite --help` stay fast: neither imports bitsandbytes, transformers or torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("bitsandbytes", "transformers", "torch", "peft")

PROBE = """
import json, sys
{code}
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))))
"""


def heavy_modules_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import qlora_lite",
    "import qlora_lite; qlora_lite.__version__; qlora_lite.QloraLiteError",
    "from qlora_lite.cli import build_parser; build_parser().format_help()",
    "from qlora_lite.config.load import config_with_overrides; config_with_overrides({'model': 'm', 'data.train': 't', 'train.max_steps': '5'})",
])  # fmt: skip
def test_no_heavy_import(code):
    assert heavy_modules_after(code) == []


def test_public_names_resolve_on_first_use():
    import qlora_lite

    for name in qlora_lite.__all__:
        assert getattr(qlora_lite, name) is not None, name
    assert callable(qlora_lite.train) and qlora_lite.train.__module__ == "qlora_lite.training.loop"


# Layers from the bottom up; a module may import from its own layer's subpackage or from any lower layer.
LAYERS = [
    {"errors"},
    {"config", "io"},
    {"model", "data"},
    {"export", "memory", "training"},
    {"demo", "doctor", "generate"},
    {"cli"},
]
# Deliberate edges within the third layer (the graph between subpackages stays acyclic; see ARCHITECTURE.md):
# training writes adapters in export's PEFT format and turns an out-of-memory into memory's advice.
SIDEWAYS = {("training", "export"), ("training", "memory")}


def _subpackage_edges() -> set[tuple[str, str]]:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "qlora_lite"
    edges = set()
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if len(parts) == 1:
            continue  # the package's own __init__ / __main__ / errors
        here = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
                there = node.module.split(".")[0]
                if there != here:
                    edges.add((here, there))
            elif isinstance(node, ast.ImportFrom) and node.level == 2 and node.module is None:
                edges.update((here, alias.name) for alias in node.names)
    return edges


def test_dependencies_point_one_way():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = sorted(
        (a, b) for a, b in _subpackage_edges()
        if level.get(b, -1) > level[a] or (level.get(b) == level[a] and (a, b) not in SIDEWAYS)
    )  # fmt: skip
    assert upward == [], f"imports against the layer order: {upward}"
