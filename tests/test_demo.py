"""Demo pieces without a full run: the shipped base asset, its checked install, its maker script, the task.

The whole `qlora-lite demo` run is tested in tests/test_train.py (it shares the training fixtures there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_lite.demo.base import BASE_ASSET, INFO_FILE, WEIGHTS_FILE, base_info, install_base, sha256_of
from qlora_lite.demo.task import SAMPLE_WORDS, greedy_answers, random_words, shift_word, task_record
from qlora_lite.errors import ModelLoadError
from tests.helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent


def test_shift_task_records():
    assert shift_word("hello") == "ifmmp" and shift_word("zebra") == "afcsb"
    assert task_record("shift", "hello") == {"prompt": "shift hello =", "completion": " ifmmp"}
    assert task_record("copy", "hello") == {"prompt": "copy hello =", "completion": " hello"}
    import random

    words = random_words(random.Random(0), 50, set(SAMPLE_WORDS))
    assert len(words) == 50 and all(len(w) == 5 and w.isalpha() and w.islower() for w in words)
    assert not set(words) & set(SAMPLE_WORDS)


def test_shipped_base_is_small_recorded_and_declared_as_package_data():
    info = base_info()
    assert info["steps"] == 400 and info["seed"] == 0 and info["dtype"] == "bfloat16"
    assert info["copy_eval_loss"] < 0.01 and info["copy_eval_loss_4bit"] < 0.01
    assert sha256_of(BASE_ASSET / WEIGHTS_FILE) == info["sha256"]
    files = {p.name for p in BASE_ASSET.iterdir()}
    assert {"config.json", WEIGHTS_FILE, "tokenizer.json", INFO_FILE} <= files
    assert sum(p.stat().st_size for p in BASE_ASSET.iterdir()) < 1 << 20
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["qlora_lite.demo"]
    shipped = {p.name for pattern in patterns for p in (ROOT / "qlora_lite" / "demo").glob(pattern) if p.is_file()}
    assert shipped == files


def test_shipped_base_still_copies_when_loaded_4bit(tmp_path):
    """The asset loads with this torch / transformers and the 4-bit base keeps its skill (what QLoRA adapts)."""
    from qlora_lite.model.loader import load_quantized

    install_base(tmp_path / "base")
    model, tokenizer = load_quantized(tmp_path / "base", bits=4, quant_type="nf4", double_quant=True, device="cpu")
    answers = greedy_answers(model, tokenizer, [task_record("copy", w)["prompt"] for w in SAMPLE_WORDS])
    assert answers == list(SAMPLE_WORDS)


def test_install_refuses_a_damaged_or_missing_asset(tmp_path):
    asset = tmp_path / "asset"
    shutil.copytree(BASE_ASSET, asset)
    weights = asset / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="do not match the sha256"):
        install_base(tmp_path / "out", asset)
    assert not (tmp_path / "out").exists()
    (asset / INFO_FILE).unlink()
    with pytest.raises(ModelLoadError, match="missing or broken"):
        install_base(tmp_path / "out", asset)


def test_make_demo_base_is_deterministic_and_records_what_it_did(tmp_path):
    """Two short runs of tools/make_demo_base.py write byte-identical weights and a matching pretrain.json."""
    tool = load_tool("make_demo_base")
    infos = [tool.make_base(tmp_path / name, steps=3, log=lambda _msg: None) for name in ("a", "b")]
    assert infos[0]["sha256"] == infos[1]["sha256"] == sha256_of(tmp_path / "a" / WEIGHTS_FILE)
    recorded = json.loads((tmp_path / "a" / INFO_FILE).read_text())
    assert recorded == infos[0]
    assert {"seed", "steps", "copy_eval_loss", "torch", "transformers", "sha256"} <= set(recorded)
    assert recorded["steps"] == 3
