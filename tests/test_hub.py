"""Models by hub id through a Hugging Face cache laid out by hand under a temporary HF_HOME (no network)."""

from __future__ import annotations

import pytest
import torch

from qlora_lite.errors import ModelLoadError
from qlora_lite.io.hub import looks_like_hub_id, resolve_model_dir

from .helpers import hf_cache_entry


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.mark.parametrize(
    "text,expected",
    [("Qwen/Qwen2.5-0.5B", True), ("meta-llama/Llama-3.2-1B", True), ("./models/x", False), ("/abs/path", False),
     ("llama-3.1-8b", False), ("a/b/c", False), ("runs/run.yaml", False)],
)  # fmt: skip
def test_hub_id_shape(text, expected):
    assert looks_like_hub_id(text) is expected


def test_a_cached_model_resolves_offline_and_loads(tiny_model_dir, hf_home):
    snapshot = hf_cache_entry(hf_home, "Org/Tiny", tiny_model_dir("llama"))
    assert resolve_model_dir("Org/Tiny") == snapshot
    from qlora_lite import load_quantized

    by_id, _ = load_quantized("Org/Tiny", device="cpu", load_tokenizer=False)
    by_path, _ = load_quantized(tiny_model_dir("llama"), device="cpu", load_tokenizer=False)
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(by_id(ids).logits, by_path(ids).logits)


def test_a_local_path_wins_over_the_cache(tiny_model_dir, hf_home, tmp_path, monkeypatch):
    hf_cache_entry(hf_home, "Org/Tiny", tiny_model_dir("llama"))
    local = tmp_path / "Org" / "Tiny"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("Org/Tiny") == local.relative_to(tmp_path)


def test_offline_and_not_cached_says_how_to_download(hf_home):
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir("Org/Missing")
    text = str(err.value)
    assert "Org/Missing is not in the Hugging Face cache" in text and "hf download Org/Missing" in text
    assert "HF_HUB_OFFLINE=1" in text


def test_offline_mode_is_the_users_choice(monkeypatch):
    """Importing the package or the CLI never turns offline mode on."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = (
        "import os, contextlib, io; from qlora_lite.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['memory', '--list-presets'])\n"
        "print(os.environ.get('HF_HUB_OFFLINE'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_memory_maps_a_hub_id_to_its_preset_without_the_cache(hf_home):
    from qlora_lite.memory.inventory import preset_for_hub_id
    from qlora_lite.memory.report import estimate_memory

    assert preset_for_hub_id("Qwen/Qwen2.5-1.5B-Instruct") == "qwen2.5-1.5b"
    assert preset_for_hub_id("meta-llama/Llama-3.1-8B") == "llama-3.1-8b"
    assert preset_for_hub_id("google/gemma-2-2b-it") == "gemma-2-2b"
    assert preset_for_hub_id("Org/Unknown-7B") is None
    assert estimate_memory("Qwen/Qwen2.5-1.5B-Instruct").total == estimate_memory("qwen2.5-1.5b").total


def test_memory_reads_an_unknown_hub_model_from_the_cache(tiny_model_dir, hf_home, capsys):
    from qlora_lite.cli.main import main

    hf_cache_entry(hf_home, "Org/Tiny", tiny_model_dir("llama"))
    assert main(["memory", "Org/Tiny", "--json"]) == 0
    by_id = capsys.readouterr().out
    assert main(["memory", str(tiny_model_dir("llama")), "--json"]) == 0
    import json

    assert json.loads(by_id)["total"] == json.loads(capsys.readouterr().out)["total"]
    assert main(["memory", "Org/Missing"]) == 2
    assert "hf download Org/Missing" in capsys.readouterr().err
