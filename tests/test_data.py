"""Data: the three record formats' label masks at exact token positions, truncation, packing, splits, errors."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_lite.config.settings import DataConfig
from qlora_lite.data.batching import IGNORE_INDEX, BatchOrder, collate, target_count
from qlora_lite.data.chat import render_chat
from qlora_lite.data.encode import build_dataset, encode_record, prepare_data
from qlora_lite.data.records import load_records, record_format
from qlora_lite.errors import DataError, QloraLiteError
from qlora_lite.model.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_no_template():
    return make_tokenizer(chat_template=False)


def _encode(tok, record):
    return encode_record(record, tok, record_format(record, "t"), "t")


def _labelled(ex) -> list[int]:
    return [i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# The tiny tokenizer has one token per byte, so character positions are token positions
# (special tokens such as </s> excepted, which the tests account for).
def test_text_record_trains_on_every_token_and_appends_eos(tok):
    ex = _encode(tok, {"text": "hello"})
    assert ex.input_ids == tok("hello").input_ids + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


def test_prompt_completion_masks_the_prompt_exactly(tok):
    ex = _encode(tok, {"prompt": "Q: 2+2=", "completion": " 4"})
    assert len(ex) == len("Q: 2+2= 4") + 1
    assert _labelled(ex) == [7, 8, 9]  # " ", "4", </s>
    assert ex.labels[7:] == tok(" 4", add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_prompt_completion_boundary_token_is_trained_on():
    """A merged token that spans the prompt/completion boundary carries completion text, so it is a target."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["ab"] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.add_special_tokens(["<pad>", "<s>", "</s>"])
    bpe = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ex = _encode(bpe, {"prompt": "xa", "completion": "by"})
    assert ex.input_ids == [vocab["x"], vocab["ab"], vocab["y"], 2]
    assert ex.labels == [IGNORE_INDEX, vocab["ab"], vocab["y"], 2]
    ex = _encode(bpe, {"prompt": "x", "completion": "aby"})
    assert ex.labels == [IGNORE_INDEX, vocab["ab"], vocab["y"], 2]


def test_messages_use_the_chat_template_and_train_on_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "z"},
    ]
    ex = _encode(tok, {"messages": messages})
    text = render_chat(tok, messages)
    assert text == "<|system|>\nbe brief<|user|>\nhi<|assistant|>\nyo</s><|user|>\nq<|assistant|>\nz</s>"
    first = len("<|system|>\nbe brief<|user|>\nhi<|assistant|>\n")
    second = (
        len("<|system|>\nbe brief<|user|>\nhi<|assistant|>\nyo</s><|user|>\nq<|assistant|>\n") - 3
    )  # </s> is one token
    assert _labelled(ex) == [first, first + 1, first + 2, second, second + 1]
    assert [tok.decode([ex.labels[i]]) for i in _labelled(ex)] == ["y", "o", "</s>", "z", "</s>"]
    assert len(ex) == len(text) - 2 * 3


def test_messages_without_a_template_use_the_documented_fallback(tok_no_template):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ex = _encode(tok_no_template, {"messages": messages})
    assert render_chat(tok_no_template, messages) == "<|user|>\nhi\n<|assistant|>\nyo</s>"
    start = len("<|user|>\nhi\n<|assistant|>\n")
    assert _labelled(ex) == [start, start + 1, start + 2]
    assert render_chat(tok_no_template, messages[:1], add_generation_prompt=True) == "<|user|>\nhi\n<|assistant|>\n"


def test_truncation_cuts_to_max_seq_len_and_counts(tok):
    records = [("a line 1", {"text": "x" * 40}), ("a line 2", {"text": "short"})]
    ds = build_dataset(records, tok, max_seq_len=16)
    assert [len(e) for e in ds.examples] == [16, 6]
    assert ds.examples[0].labels == ds.examples[0].input_ids
    assert ds.stats.truncated == 1 and ds.stats.records == 2


def test_record_longer_than_max_seq_len_is_refused_without_truncation(tok):
    with pytest.raises(
        DataError, match=r"data.jsonl line 3: the record is 41 tokens long, more than data.max_seq_len=16"
    ):
        build_dataset([("data.jsonl line 3", {"text": "x" * 40})], tok, max_seq_len=16, truncation=False)


def test_records_whose_target_is_truncated_away_are_dropped(tok):
    records = [("f line 1", {"prompt": "p" * 30, "completion": "c"}), ("f line 2", {"prompt": "p", "completion": "c"})]
    ds = build_dataset(records, tok, max_seq_len=16)
    assert ds.stats.dropped_no_target == 1 and len(ds) == 1
    with pytest.raises(DataError, match="no usable records"):
        build_dataset(records[:1], tok, max_seq_len=16)


def test_packing_concatenates_whole_examples_and_masks_each_boundary(tok):
    records = [(f"f line {i}", {"prompt": "ab", "completion": s}) for i, s in enumerate(["cd", "efg", "h", "ijklmnop"])]
    single = build_dataset(records, tok, max_seq_len=12)
    packed = build_dataset(records, tok, max_seq_len=12, packing=True)
    lengths = [len(e) for e in single.examples]  # 5, 6, 4, 11
    assert lengths == [5, 6, 4, 11]
    assert [len(e) for e in packed.examples] == [11, 4, 11]
    first = packed.examples[0]
    assert first.input_ids == single.examples[0].input_ids + single.examples[1].input_ids
    # The second example's first position would predict its first token from the first example: no loss there.
    assert first.labels[:5] == single.examples[0].labels
    assert first.labels[5] == IGNORE_INDEX and first.labels[6:] == single.examples[1].labels[1:]
    assert packed.stats.sequences == 3 and packed.stats.packed


def test_collate_pads_right_and_masks_padding(tok):
    a = _encode(tok, {"text": "abc"})
    b = _encode(tok, {"prompt": "a", "completion": "b"})
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [a.input_ids, b.input_ids + [0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [a.labels, [IGNORE_INDEX, b.input_ids[1], tok.eos_token_id, IGNORE_INDEX]]
    assert target_count(batch["labels"]) == 3 + 2


def test_batch_order_visits_each_example_once_per_epoch_and_resumes(tok):
    order = BatchOrder(10, 4, seed=3)
    seen = [order.next_indices() for _ in range(3)]
    assert [len(b) for b in seen] == [4, 4, 2]
    assert sorted(i for b in seen for i in b) == list(range(10))
    seen += [order.next_indices() for _ in range(2)]
    state = order.state()
    rest = [order.next_indices() for _ in range(4)]
    resumed = BatchOrder(10, 4, seed=3, epoch=state["epoch"], index=state["index"])
    assert [resumed.next_indices() for _ in range(4)] == rest
    assert seen[3] != seen[0] or seen[4] != seen[1]  # a new permutation each epoch


def test_jsonl_and_json_array_files_and_eval_split(tmp_path, tok):
    recs = [{"text": f"record {i}"} for i in range(20)]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", recs)
    (tmp_path / "d.json").write_text(json.dumps(recs))
    assert [r for _, r in load_records(jsonl)] == [r for _, r in load_records(tmp_path / "d.json")] == recs
    train, evals = prepare_data(DataConfig(train=str(jsonl), eval_fraction=0.2, max_seq_len=32), tok, seed=1)
    assert (len(train), len(evals)) == (16, 4)
    texts = lambda ds: {tok.decode(e.input_ids[:-1]) for e in ds.examples}  # noqa: E731
    assert not texts(train) & texts(evals) and len(texts(train) | texts(evals)) == 20
    again, evals2 = prepare_data(DataConfig(train=str(jsonl), eval_fraction=0.2, max_seq_len=32), tok, seed=1)
    assert texts(evals2) == texts(evals)
    eval_file = _write_jsonl(tmp_path / "e.jsonl", recs[:3])
    _, from_file = prepare_data(DataConfig(train=str(jsonl), eval=str(eval_file), max_seq_len=32), tok)
    assert len(from_file) == 3


@pytest.mark.parametrize(
    "lines, pattern",
    [
        (['{"text": "ok"}', '{"text": "broken"'], r"bad.jsonl line 2 is not valid JSON"),
        (['{"text": "ok"}', "", '{"prompt": "only a prompt"}'], r"bad.jsonl line 3: .*no 'completion'"),
        (
            ['{"input": "x", "output": "y"}'],
            r"bad.jsonl line 1: record has none of the fields 'text', 'prompt'\+'completion' or 'messages' \(it has: input, output\)",
        ),
        (['{"text": 5}'], r"line 1: 'text' must be a string"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r"line 1: 'messages' has no assistant turn"),
        (['{"messages": [{"role": "user"}]}'], r"line 1: messages\[0\] needs a string 'role' and a string 'content'"),
        (['["a", "list"]'], r"line 1 is a JSON list, not an object"),
        (["", "  "], r"bad.jsonl holds no records"),
    ],
)
def test_bad_data_names_file_line_and_field(tmp_path, tok, lines, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=pattern) as info:
        build_dataset(load_records(path), tok, max_seq_len=64)
    assert isinstance(info.value, QloraLiteError)


def test_missing_file_and_hub_names(tmp_path):
    """A missing file is named; a hub dataset id is read from the HF cache (tests/test_hub.py)."""
    with pytest.raises(DataError, match=r"data file .*nope.jsonl does not exist; give the path of a JSONL file\.$"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"data file nope does not exist; .* or a hub dataset id \(Org/Name\)\.$"):
        load_records("nope")


def test_chat_without_template_render_matches_generation_prompt(tok):
    # The prefix used to locate an assistant turn is exactly what generation feeds the model.
    messages = [{"role": "user", "content": "upper: abc"}]
    prompt = render_chat(tok, messages, add_generation_prompt=True)
    full = render_chat(tok, messages + [{"role": "assistant", "content": "ABC"}])
    assert full.startswith(prompt) and full[len(prompt) :] == "ABC</s>"
    ids = torch.tensor(_encode(tok, {"messages": messages + [{"role": "assistant", "content": "ABC"}]}).input_ids)
    assert ids[: len(prompt)].tolist() == tok(prompt, add_special_tokens=False).input_ids


def test_prepare_data_puts_the_system_prompt_in_train_and_eval(tmp_path, tok):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = _write_jsonl(tmp_path / "chat.jsonl", [chat] * 4)
    config = DataConfig(train=str(path), eval=str(path), max_seq_len=64, system_prompt="Be kind.")
    train, evals = prepare_data(config, tok)
    for ex in (*train.examples, *evals.examples):
        assert tok.decode(ex.input_ids).startswith("<|system|>\nBe kind.<|user|>\nhi")
        assert tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]) == "yo</s>"
