"""Small numeric helpers shared by the tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def load_tool(name: str) -> ModuleType:
    """Import `tools/<name>.py` (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
