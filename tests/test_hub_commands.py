"""Every command that names a model or a dataset, by hub id, offline from a Hugging Face cache laid out by hand.

One run trains `model: Org/Tiny` at a pinned `revision` on `data.train: Org/Data`; export, generate and chat then
name the same base by id. The cache holds two snapshots of Org/Tiny of different widths (refs/main -> A, hidden
size 64; B by commit hash, hidden size 96), so loading the wrong one fails loudly: the adapter no longer fits.
(`memory Org/Tiny` is in tests/test_hub.py.)
"""

from __future__ import annotations

import io
import json
import sys
from types import SimpleNamespace

import pytest
import yaml
from safetensors import safe_open

from qlora_lite.cli import main

from .helpers import hf_cache_entry

A, B = "a" * 40, "b" * 40
GREEDY = ["--greedy", "--max-new-tokens", "4"]


def _records(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"prompt": f"word{i} ->", "completion": " ok!"}) + "\n" for i in range(start, start + n))


@pytest.fixture(scope="module")
def hub_run(tiny_model_dir, tmp_path_factory):
    """The cache (Org/Tiny at A and B, dataset Org/Data with train/test files) and a 2-step run trained by id."""
    root = tmp_path_factory.mktemp("hub-commands")
    home = root / "hf"
    wide = tiny_model_dir("llama", hidden_size=96)
    hf_cache_entry(home, "Org/Tiny", wide, revision=B)
    hf_cache_entry(home, "Org/Tiny", tiny_model_dir("llama"), revision=A)  # refs/main -> A
    data = root / "data-source"
    data.mkdir()
    (data / "train.jsonl").write_text(_records(16))
    (data / "test.jsonl").write_text(_records(4, start=100))
    hf_cache_entry(home, "Org/Data", data, repo_type="dataset")
    config = {
        "model": "Org/Tiny",
        "revision": B,
        "output_dir": str(root / "run"),
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": "Org/Data", "eval": "Org/Data:test", "max_seq_len": 32},
        "train": {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "log_every": 1},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        code = main(["train", str(root / "run.yaml")])
        yield SimpleNamespace(
            root=root, home=home, wide=wide, run=root / "run", adapter=root / "run" / "adapter", code=code
        )


def test_train_reads_the_model_at_its_revision_and_the_dataset_by_hub_id(hub_run):
    assert hub_run.code == 0
    logged = [json.loads(line) for line in (hub_run.run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss" in row] == [1, 2]
    assert any("eval_loss" in row for row in logged), logged  # the eval split Org/Data:test was read too
    with safe_open(hub_run.adapter / "adapter_model.safetensors", "pt") as f:
        widths = {f.get_slice(key).get_shape()[1] for key in f.keys() if "q_proj.lora_A" in key}
    assert widths == {96}  # trained on snapshot B, not main's A (hidden size 64)
    assert yaml.safe_load((hub_run.run / "config.yaml").read_text())["revision"] == B


def test_train_with_an_uncached_dataset_says_how_to_download(hub_run, capsys):
    assert main(["train", str(hub_run.root / "run.yaml"), "--data.train", "Org/Nope",
                 "--output_dir", str(hub_run.root / "run-nope")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "dataset Org/Nope is not in the Hugging Face cache" in err
    assert "`hf download --repo-type dataset Org/Nope`" in err and "Traceback" not in err


def test_export_by_hub_id_at_the_revision(hub_run, capsys):
    from qlora_lite import export_merged
    from qlora_lite.errors import AdapterError

    out = hub_run.root / "merged"
    base = ["export", "--base", "Org/Tiny", "--adapter", str(hub_run.adapter)]
    assert main([*base, "--revision", B, "--out", str(out), "--verify"]) == 0
    assert "verify: largest relative logit difference" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 96
    assert main([*base, "--out", str(hub_run.root / "merged-main")]) == 2  # main is A: the adapter does not fit
    assert "belongs to a different base model" in capsys.readouterr().err
    library = export_merged("Org/Tiny", hub_run.adapter, hub_run.root / "merged-lib", revision=B)
    assert json.loads((library / "config.json").read_text())["hidden_size"] == 96
    with pytest.raises(AdapterError):
        export_merged("Org/Tiny", hub_run.adapter, hub_run.root / "merged-lib-main")


def test_generate_and_chat_by_hub_id_at_the_revision(hub_run, capsys, monkeypatch):
    prompt = ["--adapter", str(hub_run.adapter), "--prompt", "word3 ->", *GREEDY]
    assert main(["generate", "--model", "Org/Tiny", "--revision", B, *prompt]) == 0
    by_id = json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", str(hub_run.wide), *prompt]) == 0
    assert by_id["tokens"] == json.loads(capsys.readouterr().out)["tokens"] and len(by_id["tokens"]) > 0

    monkeypatch.setattr(sys, "stdin", io.StringIO("word3 ->\n/exit\n"))
    chat = ["chat", "--model", "Org/Tiny", "--revision", B, "--adapter", str(hub_run.adapter), *GREEDY]
    assert main(chat) == 0
    done = capsys.readouterr()
    assert f"snapshots/{B}" in done.err and done.out.strip()
