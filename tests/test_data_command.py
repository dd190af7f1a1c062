"""`qlora-lite data`: the training data as tokenized, with exactly the loss-carrying tokens marked."""

from __future__ import annotations

import json

import pytest
import yaml

from qlora_lite.cli import main

RECORDS = [
    {"prompt": "Q: two plus two? A:", "completion": " four"},
    {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]},
    {"prompt": "Q: " + "x" * 200 + "? A:", "completion": " long"},  # truncated at max_seq_len 64
]


@pytest.fixture
def config_path(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = {
        "model": str(tiny_model_dir("llama")),
        "train": {"max_steps": 1},
        "data": {"train": str(data), "max_seq_len": 64},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _report(capsys, *argv: str) -> dict:
    assert main(["data", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _loss_text(item: dict) -> str:
    return "".join(s["text"] for s in item["segments"] if s["loss"])


def test_json_marks_exactly_the_completion_and_assistant_tokens(config_path, capsys):
    report = _report(capsys, config_path)
    first, second = report["sequences"]  # the third record lost its target to truncation and was dropped
    # the tiny byte tokenizer: one token per character, "</s>" is EOS
    assert _loss_text(first) == " four</s>"
    assert first["marked"] == "Q: two plus two? A:[[ four</s>]]"
    assert _loss_text(second) == "hello!</s>"  # the assistant turn and its end of turn, nothing of the user's
    assert second["marked"] == "<|user|>\nhi there<|assistant|>\n[[hello!</s>]]"
    assert (first["tokens"], first["loss_tokens"]) == (len("Q: two plus two? A: four") + 1, len(" four") + 1)
    assert second["loss_tokens"] == len("hello!") + 1
    assert report["counts"] == {
        "records": 3,
        "sequences": 2,
        "tokens": first["tokens"] + second["tokens"],
        "loss_tokens": first["loss_tokens"] + second["loss_tokens"],
        "truncated": 1,
        "dropped_no_target": 1,
        "packed": False,
    }
    lo, hi = sorted([first["tokens"], second["tokens"]])
    assert report["lengths"] == {"min": lo, "median": (lo + hi) / 2, "p95": hi, "max": hi}


def test_index_override_and_plain_rendering(config_path, capsys):
    report = _report(capsys, config_path, "--index", "0", "--data.packing", "true")
    (pack,) = report["sequences"]
    assert report["counts"]["packed"] is True and report["counts"]["sequences"] == 1
    assert pack["marked"] == "Q: two plus two? A:[[ four</s>]]<|user|>\nhi there<|assistant|>\n[[hello!</s>]]"

    assert main(["data", config_path, "--records", "1"]) == 0  # captured stdout is not a terminal: brackets
    out = capsys.readouterr().out
    assert "Q: two plus two? A:[[ four</s>]]" in out and "hello!" not in out
    assert "3 records -> 2 sequences" in out and "tokens per sequence: min 25" in out


def test_bad_index_is_one_line_exit_2(config_path, capsys):
    assert main(["data", config_path, "--index", "99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --index 99 is out of range") and "\n" not in err


def test_per_source_counts_for_several_sources(tiny_model_dir, tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"q{i} =", "completion": f" a{i}"}) + "\n" for i in range(6)))
    b.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}!"}) + "\n" for i in range(2)))
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"model": str(tiny_model_dir("llama")), "train": {"max_steps": 1},
             "data": {"train": [str(a), {"path": str(b), "format": "alpaca"}], "max_seq_len": 64}}
        )
    )  # fmt: skip
    report = _report(capsys, str(cfg))
    sources = report["sources"]
    assert [(s["records"], s["sequences"]) for s in sources] == [(6, 6), (2, 2)]
    assert sum(s["tokens"] for s in sources) == report["counts"]["tokens"]
    assert sum(s["loss_tokens"] for s in sources) == report["counts"]["loss_tokens"]
    assert main(["data", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "data.train[1]" in text and "2 records -> 2 sequences" in text
