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
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import qlora_lite",
    "import qlora_lite; qlora_lite.__version__; qlora_lite.QloraLiteError",
    "from qlora_lite.cli.main import build_parser; build_parser().format_help()",
    "from qlora_lite.config.load import config_with_overrides; config_with_overrides({'model': 'm', 'data.train': 't'})",
])  # fmt: skip
def test_no_heavy_import(code):
    assert heavy_modules_after(code) == []


def test_public_names_resolve_on_first_use():
    import qlora_lite

    for name in qlora_lite.__all__:
        assert getattr(qlora_lite, name) is not None, name
    assert callable(qlora_lite.train) and qlora_lite.train.__module__ == "qlora_lite.training.loop"
