"""Data as users have it: alpaca, ShareGPT and column-mapped records tokenize exactly like their TRL
equivalents; several sources are checked, mixed by weight (reproducibly), and counted per source."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from qlora_lite.config.load import load_config
from qlora_lite.config.settings import DataConfig
from qlora_lite.data.encode import prepare_data
from qlora_lite.data.mix import mixture_counts, parse_sources
from qlora_lite.errors import ConfigError, DataError
from qlora_lite.model.tiny import make_tokenizer
from qlora_lite.training.checkpoint import data_fingerprint


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _jsonl(path: Path, *records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _encoded(tmp_path: Path, tok, name: str, record: dict, **source) -> tuple[list[int], list[int]]:
    """input_ids and labels of one record read from a file as a source (with `source` options)."""
    path = _jsonl(tmp_path / name, record)
    train = [{"path": str(path), **source}] if source else str(path)
    ds, _ = prepare_data(DataConfig(train=train, max_seq_len=256), tok)
    (ex,) = ds.examples
    return ex.input_ids, ex.labels


@pytest.mark.parametrize(
    "native, equivalent",
    [
        (
            {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
            {"prompt": "Add the numbers.\n\n2 and 2\n\n", "completion": "4"},
        ),
        (  # an empty input adds nothing
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"prompt": "Say hi.\n\n", "completion": "hi"},
        ),
        (  # a system turn makes it a conversation
            {"instruction": "Add.", "input": "1 and 2", "output": "3", "system": "Be terse."},
            {
                "messages": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Add.\n\n1 and 2"},
                    {"role": "assistant", "content": "3"},
                ]
            },
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "Be kind."},
                    {"from": "human", "value": "hello"},
                    {"from": "gpt", "value": "hi there"},
                    {"from": "user", "value": "and?"},
                    {"from": "assistant", "value": "bye"},
                ]
            },
            {
                "messages": [
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": "hi there"},
                    {"role": "user", "content": "and?"},
                    {"role": "assistant", "content": "bye"},
                ]
            },
        ),
    ],
    ids=["alpaca-input", "alpaca-empty-input", "alpaca-system", "sharegpt"],
)
def test_native_formats_give_the_ids_and_masks_of_their_equivalent(tmp_path, tok, native, equivalent):
    ids, labels = _encoded(tmp_path, tok, "native.jsonl", native)
    want_ids, want_labels = _encoded(tmp_path, tok, "equivalent.jsonl", equivalent)
    assert ids == want_ids
    assert labels == want_labels
    assert any(lab == -100 for lab in labels) and any(lab != -100 for lab in labels)  # a real mask, not all/none


def test_explicit_format_matches_auto_and_column_mapping_renames_before_detection(tmp_path, tok):
    alpaca = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    auto = _encoded(tmp_path, tok, "a.jsonl", alpaca)
    assert _encoded(tmp_path, tok, "b.jsonl", alpaca, format="alpaca") == auto
    mapped = _encoded(
        tmp_path, tok, "q.jsonl", {"question": "Q: 1+1=", "answer": " 2", "id": 7},
        columns={"question": "prompt", "answer": "completion"},
    )  # fmt: skip
    assert mapped == _encoded(tmp_path, tok, "pc.jsonl", {"prompt": "Q: 1+1=", "completion": " 2"})
    mapped_alpaca = _encoded(
        tmp_path, tok, "task.jsonl", {"task": "Add.", "data": "2 and 3", "answer": "5"},
        columns={"task": "instruction", "data": "input", "answer": "output"},
    )  # fmt: skip
    assert mapped_alpaca == auto


def test_source_format_and_mapping_errors_name_the_source_line_and_field(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", {"question": "x", "answer": "y"}, {"question": "x"})
    with pytest.raises(DataError) as caught:
        prepare_data(
            DataConfig(train=[{"path": str(path), "columns": {"question": "prompt", "answer": "completion"}}]), tok
        )
    assert str(caught.value) == (
        f"data.train[0].columns maps 'answer', but {path} line 2 has no field 'answer' (it has: question); "
        "fix data.train[0].columns or the record."
    )
    text = _jsonl(tmp_path / "t.jsonl", {"text": "hello"})
    with pytest.raises(DataError, match=r"t.jsonl line 1 is not a messages record \(it has: text\) although its "):
        prepare_data(DataConfig(train=[{"path": str(text), "format": "messages"}]), tok)
    odd = _jsonl(tmp_path / "s.jsonl", {"conversations": [{"from": "bot", "value": "hi"}]})
    with pytest.raises(DataError, match=r"s.jsonl line 1: conversations\[0\] is from 'bot', which is none of human"):
        prepare_data(DataConfig(train=str(odd)), tok)


@pytest.mark.parametrize(
    "train, message",
    [
        ([{"path": "a.jsonl", "weight": 0}], "data.train[0].weight is 0; a weight is a number > 0"),
        (["a.jsonl", {"path": "b.jsonl", "weight": -1}], "data.train[1].weight is -1;"),
        ([{"path": "a.jsonl", "format": "alpacca"}], "data.train[0].format is 'alpacca' (did you mean 'alpaca'?)"),
        ([{"path": "a.jsonl", "wieght": 1}], "data.train[0] has the unknown key 'wieght' (did you mean 'weight'?)"),
        ([{"weight": 1}], "data.train[0].path is None;"),
        ([{"path": "a.jsonl", "columns": ["q"]}], "data.train[0].columns is ['q']; write it as a mapping"),
    ],
)
def test_bad_sources_are_one_sentence_naming_the_entry(train, message):
    with pytest.raises(ConfigError) as caught:
        parse_sources(train)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_mixture_counts_follow_the_documented_rule():
    # largest source 300 with share 0.75 -> an epoch of 400: 300 + 100
    assert mixture_counts([300, 40], [0.75, 0.25]) == [300, 100]
    # largest source 100 with share 1/3 -> an epoch of 300: 100 + 200 (the small source repeated 5 times)
    assert mixture_counts([100, 40], [1, 2]) == [100, 200]
    assert mixture_counts([10, 10], [1000, 0.001]) == [10, 1]  # every source supplies at least one


def test_weighted_sources_are_drawn_in_proportion_reproducibly(tmp_path, tok):
    """Two sources weighted 0.75/0.25 supply 3/4 and 1/4 of an epoch. The counts are exact (the rule rounds once,
    so the tolerance is one sequence); only which records and their order depend on the seed."""
    big = _jsonl(tmp_path / "big.jsonl", *({"text": f"b{i}"} for i in range(60)))
    small = _jsonl(tmp_path / "small.jsonl", *({"prompt": f"s{i}", "completion": "!"} for i in range(7)))
    config = DataConfig(train=[{"path": str(big), "weight": 0.75}, {"path": str(small), "weight": 0.25}])
    train, _ = prepare_data(config, tok, seed=3)
    origin = Counter(ex.source.split(" line ")[0] for ex in train.examples)
    assert abs(origin[str(big)] - 60) <= 1 and abs(origin[str(small)] - 20) <= 1
    share = origin[str(big)] / sum(origin.values())
    assert abs(share - 0.75) <= 1 / 80
    # the small source (7 records, 20 draws) is repeated whole twice, then 6 more distinct ones
    small_lines = Counter(ex.source for ex in train.examples if ex.source.startswith(str(small)))
    assert len(small_lines) == 7 and sorted(small_lines.values()) == [2] + [3] * 6
    # interleaved, not one source after the other
    first_half = Counter(ex.source.startswith(str(small)) for ex in train.examples[:40])
    assert 0 < first_half[True] < 20
    again, _ = prepare_data(config, tok, seed=3)
    other, _ = prepare_data(config, tok, seed=4)
    assert [e.source for e in again.examples] == [e.source for e in train.examples]
    assert [e.source for e in other.examples] != [e.source for e in train.examples]
    big_stats, small_stats = train.stats.sources
    assert (big_stats.name, big_stats.records, big_stats.sequences) == ("data.train[0]", 60, 60)
    assert (small_stats.name, small_stats.records, small_stats.sequences) == ("data.train[1]", 7, 20)


def test_unweighted_sources_concatenate_with_per_source_stats(tmp_path, tok):
    a = _jsonl(tmp_path / "a.jsonl", {"text": "abc"}, {"text": "de"})
    b = _jsonl(tmp_path / "b.jsonl", {"prompt": "Q:", "completion": "xy"})
    train, _ = prepare_data(DataConfig(train=[str(a), {"path": str(b)}], max_seq_len=64), tok)
    assert [e.source for e in train.examples] == [f"{a} line 1", f"{a} line 2", f"{b} line 1"]
    sa, sb = train.stats.sources
    assert (sa.records, sa.sequences, sa.tokens) == (2, 2, sum(len(e) for e in train.examples[:2]))
    assert (sb.records, sb.sequences, sb.tokens) == (1, 1, len(train.examples[2]))
    assert sb.target_tokens == sum(1 for lab in train.examples[2].labels[1:] if lab != -100)
    assert sa.target_tokens + sb.target_tokens == train.stats.target_tokens
    assert train.stats.records == 3 and train.stats.formats == {"text": 2, "prompt_completion": 1}
    packed, _ = prepare_data(DataConfig(train=[str(a), str(b)], max_seq_len=64, packing=True), tok)
    assert packed.stats.sequences == 1 and [s.sequences for s in packed.stats.sources] == [2, 1]


def test_yaml_resolves_each_source_path_and_fingerprint_hashes_each_file(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", {"text": "x"})
    _jsonl(folder / "b.jsonl", {"text": "y"})
    (folder / "run.yaml").write_text(
        "model: m\ntrain: {max_steps: 1}\ndata:\n  train:\n    - a.jsonl\n    - {path: b.jsonl, weight: 2}\n"
    )
    config = load_config(folder / "run.yaml")
    assert config.data.train == [str(folder / "a.jsonl"), {"path": str(folder / "b.jsonl"), "weight": 2}]
    found = data_fingerprint(config)
    assert set(found) == {"train[0]", "train[1]"}
    assert found["train[1]"]["file"] == str(folder / "b.jsonl") and len(found["train[1]"]["sha256"]) == 64
