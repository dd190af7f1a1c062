"""Models and datasets by hub id through a Hugging Face cache laid out by hand under a temporary HF_HOME (no network)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from qlora_lite.errors import DataError, ModelLoadError
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
        "import os, contextlib, io; from qlora_lite.cli import main\n"
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
    from qlora_lite.cli import main

    hf_cache_entry(hf_home, "Org/Tiny", tiny_model_dir("llama"))
    assert main(["memory", "Org/Tiny", "--json"]) == 0
    by_id = capsys.readouterr().out
    assert main(["memory", str(tiny_model_dir("llama")), "--json"]) == 0
    import json

    assert json.loads(by_id)["total"] == json.loads(capsys.readouterr().out)["total"]
    assert main(["memory", "Org/Missing"]) == 2
    assert "hf download Org/Missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ revisions
A, B = "a" * 40, "b" * 40


def two_revisions(hf_home, tiny_model_dir):
    """Org/Tiny with refs/main -> A (hidden size 64) and B (hidden size 96, also the branch `dev`)."""
    hf_cache_entry(hf_home, "Org/Tiny", tiny_model_dir("llama", hidden_size=96), revision=B)
    snapshot_a = hf_cache_entry(hf_home, "Org/Tiny", tiny_model_dir("llama"), revision=A)  # refs/main -> A
    (hf_home / "hub" / "models--Org--Tiny" / "refs" / "dev").write_text(B)
    return snapshot_a, snapshot_a.parent / B


def test_a_revision_picks_its_snapshot_and_that_model_loads(tiny_model_dir, hf_home):
    from qlora_lite.generate.load import load_for_generation
    from qlora_lite.model.loader import check_model_dir

    snapshot_a, snapshot_b = two_revisions(hf_home, tiny_model_dir)
    assert check_model_dir("Org/Tiny") == check_model_dir("Org/Tiny", "") == snapshot_a
    assert check_model_dir("Org/Tiny", B) == check_model_dir("Org/Tiny", "dev") == snapshot_b
    assert load_for_generation("Org/Tiny", device="cpu").model.config.hidden_size == 64
    assert load_for_generation("Org/Tiny", device="cpu", revision=B).model.config.hidden_size == 96
    with pytest.raises(ModelLoadError) as err:
        check_model_dir("Org/Tiny", "v9")
    assert "Org/Tiny at revision v9 is not in the Hugging Face cache" in str(err.value)
    assert "`hf download Org/Tiny --revision v9`" in str(err.value)


# ------------------------------------------------------------------------------------------ datasets
def dataset(hf_home, tmp_path, files: dict[str, str]):
    """A hand-made cache entry for the dataset repo Org/Data holding `files` (relative path -> text)."""
    source = tmp_path / "dataset-source"
    for rel, text in files.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_text(text)
    return hf_cache_entry(hf_home, "Org/Data", source, repo_type="dataset")


def lines(*texts: str) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


@pytest.mark.parametrize(
    "files,name,expected",
    [
        ({"train.jsonl": lines("a", "b"), "test.jsonl": lines("t")}, "Org/Data",
         [("train.jsonl line 1", "a"), ("train.jsonl line 2", "b")]),
        ({"train.jsonl": lines("a"), "test.jsonl": lines("t")}, "Org/Data:test", [("test.jsonl line 1", "t")]),
        ({"data/train-00000-of-00002.jsonl": lines("a"), "data/train-00001-of-00002.jsonl": lines("b"),
          "data/validation-00000-of-00001.jsonl": lines("v")}, "Org/Data",
         [("data/train-00000-of-00002.jsonl line 1", "a"), ("data/train-00001-of-00002.jsonl line 1", "b")]),
        ({"alpaca_train.json": '[{"text": "a"}]', "alpaca_dev.json": '[{"text": "v"}]'}, "Org/Data:validation",
         [("alpaca_dev.json[0]", "v")]),
        ({"train.json": lines("a", "b")}, "Org/Data", [("train.json line 1", "a"), ("train.json line 2", "b")]),
        ({"records.jsonl": lines("a"), "dataset_infos.json": "{}"}, "Org/Data", [("records.jsonl line 1", "a")]),
        ({"train.jsonl": lines("a"), "train.parquet": "same rows, not read"}, "Org/Data", [("train.jsonl line 1", "a")]),
        ({"train/part-0.jsonl": lines("a"), "test/part-0.jsonl": lines("t")}, "Org/Data", [("train/part-0.jsonl line 1", "a")]),
    ],
)  # fmt: skip
def test_a_hub_dataset_reads_its_splits_files_from_the_cache(hf_home, tmp_path, files, name, expected):
    from qlora_lite.data.records import load_records

    dataset(hf_home, tmp_path, files)
    assert load_records(name) == [(f"Org/Data/{where}", {"text": text}) for where, text in expected]


@pytest.mark.parametrize(
    "files,name,message",
    [
        ({"train.jsonl": lines("a")}, "Org/Data:validation",
         "dataset Org/Data has no 'validation' split (its file names carry the splits train); "
         "name one of its splits as Org/Data:SPLIT."),
        ({"records.jsonl": lines("a")}, "Org/Data:test",
         "dataset Org/Data has no 'test' split (its files are records.jsonl); name one of its splits as Org/Data:SPLIT."),
        ({"README.md": "# csv only", "train.csv": "text\na\n"}, "Org/Data", "dataset Org/Data has no JSON, JSONL or Parquet files"),
        ({"train.jsonl": '{"text": "a"}\n{"text": \n'}, "Org/Data", "Org/Data/train.jsonl line 2 is not valid JSON"),
        ({"train.jsonl": "\n"}, "Org/Data", "the train split of dataset Org/Data holds no records (train.jsonl)"),
        ({"train.jsonl": lines("a")}, "Org/Data:no split!", "data file Org/Data:no split! does not exist"),
    ],
)  # fmt: skip
def test_a_hub_dataset_that_cannot_be_used_is_one_sentence(hf_home, tmp_path, files, name, message):
    from qlora_lite.data.records import load_records

    dataset(hf_home, tmp_path, files)
    with pytest.raises(DataError) as err:
        load_records(name)
    assert message in str(err.value)


def test_parquet_needs_pyarrow_and_says_which_extra(hf_home, tmp_path, monkeypatch):
    from qlora_lite.data.records import load_records

    dataset(hf_home, tmp_path, {"data/train-00000-of-00001.parquet": "PAR1"})
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError) as err:
        load_records("Org/Data")
    assert str(err.value) == (
        "Org/Data/data/train-00000-of-00001.parquet is a Parquet file, which needs pyarrow; install the datasets "
        "extra (`pip install 'qlora-lite[datasets]'`) or convert the dataset to JSONL."
    )


def test_parquet_is_read_when_pyarrow_is_installed(hf_home, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from qlora_lite.data.records import load_records

    source = tmp_path / "parquet-source" / "data"
    source.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}), source / "train-0.parquet")
    hf_cache_entry(hf_home, "Org/Data", source.parent, repo_type="dataset")
    assert load_records("Org/Data") == [
        ("Org/Data/data/train-0.parquet[0]", {"prompt": "p1", "completion": "c1"}),
        ("Org/Data/data/train-0.parquet[1]", {"prompt": "p2", "completion": "c2"}),
    ]


def test_an_uncached_dataset_offline_says_how_to_download(hf_home):
    from qlora_lite.data.records import load_records

    with pytest.raises(DataError) as err:
        load_records("Org/Missing:test")
    text = str(err.value)
    assert "dataset Org/Missing is not in the Hugging Face cache" in text
    assert "`hf download --repo-type dataset Org/Missing`" in text and "HF_HUB_OFFLINE=1" in text
