"""Training data: read JSONL / JSON records, tokenize them with loss masks, truncate, pack, batch.

Records follow TRL's conventions, detected per record:
- `{"text": ...}`: loss on every token (EOS appended);
- `{"prompt": ..., "completion": ...}`: loss on the completion (and the EOS appended to it) only;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the tokenizer's chat template, or
  with `FALLBACK_CHAT_TEMPLATE` when the tokenizer has none; loss on the assistant turns only.

Masks are computed on characters and mapped to tokens through the tokenizer's offset mapping, so the
tokens trained on are exactly the tokens the model sees when the same text is tokenized whole (no
boundary artefacts from tokenizing pieces separately); a token is trained on when it holds any target
character. Labels are aligned with `input_ids`
(`labels[j]` is the target for position j; -100 means no loss); the loss shifts them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config.settings import DataConfig
from ..errors import DataError

IGNORE_INDEX = -100

# Used only when the tokenizer ships no chat template: a role header per turn, the content, and the
# tokenizer's EOS after each assistant turn so the model learns where an answer ends.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' if messages else '<|assistant|>\\n' }}{% endif %}"
)

FORMATS = ("text", "prompt_completion", "messages")


@dataclass
class Example:
    """One tokenized training sequence: token ids, aligned labels (-100 = no loss) and where it came from."""

    input_ids: list[int]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DatasetStats:
    """What preparation did to the records, for the progress header and the summary."""

    records: int = 0
    sequences: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    packed: bool = False


@dataclass
class TokenizedDataset:
    """Tokenized sequences ready for batching, with their statistics."""

    examples: list[Example]
    stats: DatasetStats

    def __len__(self) -> int:
        return len(self.examples)


# ------------------------------------------------------------------------------------------ reading
def _hub_dataset(name: str) -> list[tuple[str, dict]] | None:
    """Records of a Hugging Face `datasets` name ('org/name' or 'org/name:split'), or None if unavailable."""
    try:
        import datasets  # optional dependency
    except ImportError:
        return None
    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as exc:  # datasets raises many unrelated types (connection, file, value)
        raise DataError(f"the datasets library cannot load {name!r} ({str(exc).splitlines()[0][:160]}); check the name or use a local JSONL file.") from None
    return [(f"{name}[{i}]", dict(row)) for i, row in enumerate(ds)]


def load_records(source: str | Path) -> list[tuple[str, dict]]:
    """(location, record) pairs from a .jsonl file, a .json array, or a Hugging Face datasets name.

    The location ('file:line' or 'file[index]') is what error messages name.
    """
    path = Path(source)
    if not path.exists():
        looks_like_file = path.suffix in (".jsonl", ".json") or str(source).startswith((".", "/"))
        records = None if looks_like_file else _hub_dataset(str(source))
        if records is not None:
            return records
        hint = "" if looks_like_file else " (a Hugging Face dataset name needs `pip install datasets`)"
        raise DataError(f"data file {source} does not exist{hint}; give the path of a JSONL file.")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give the path of a .jsonl or .json data file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is allowed and dropped
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line} is not UTF-8 text ({exc.reason} at byte {exc.start} of the file); save the file as UTF-8."
        ) from None
    if path.suffix == ".json" or (path.suffix != ".jsonl" and text.lstrip().startswith("[")):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); fix the file or write one JSON object per line (.jsonl).") from None
        if not isinstance(data, list):
            raise DataError(f"{path} holds a JSON {type(data).__name__}, not an array of records; write a list of objects or JSONL.")
        records = [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                problem = exc.msg[: -len(" at")] if exc.msg.endswith(" at") else exc.msg  # "Unterminated string starting at"
                raise DataError(f"{path} line {number} is not valid JSON ({problem} at column {exc.colno}); fix or remove that line.") from None
            records.append((f"{path} line {number}", rec))
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{where} is a JSON {type(rec).__name__}, not an object; each record must be an object such as {{\"text\": ...}}.")
    if not records:
        raise DataError(f"{path} holds no records; add at least one JSON object.")
    return records


def record_format(record: dict, where: str) -> str:
    """'text', 'prompt_completion' or 'messages', or a `DataError` naming the missing or mistyped field."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'.")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn; add one.")
        return "messages"
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f"{where}: record has 'prompt' or 'completion' but no {key!r}; prompt/completion records need both.")
            if not isinstance(record[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}.")
        return "prompt_completion"
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}.")
        return "text"
    keys = ", ".join(sorted(record)) or "none"
    raise DataError(
        f"{where}: record has none of the fields 'text', 'prompt'+'completion' or 'messages' (it has: {keys}); "
        "use one of TRL's three formats."
    )


# ---------------------------------------------------------------------------------------- encoding
def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or `FALLBACK_CHAT_TEMPLATE` when it has none."""
    return getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text through the chat template (the fallback one if the tokenizer has none)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template(tokenizer)
    )


def _tokenize_with_mask(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool, where: str):
    """Token ids of `text` and labels that keep exactly the tokens holding a character of one of the char spans.

    A token that straddles a span boundary (e.g. 'Ġ4' from prompt 'Q: ' + completion '4') is trained on:
    it carries target text, and masking it would drop the answer's first token.
    """
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, return_attention_mask=False)
    except NotImplementedError:
        raise DataError(f"{where}: the tokenizer is not a fast tokenizer, so loss masks cannot be placed; use a model with tokenizer.json.") from None
    ids = list(enc["input_ids"])
    labels = []
    for tok, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = end > start and any(start < b and end > a for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return ids, labels


def _append_eos(tokenizer, ids: list[int], labels: list[int], train_on_it: bool) -> None:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos if train_on_it else IGNORE_INDEX)


def encode_record(record: dict, tokenizer, fmt: str, where: str) -> Example:
    """Tokenize one record (no truncation) with the labels of its format."""
    if fmt == "text":
        ids, labels = _tokenize_with_mask(tokenizer, record["text"], [(0, len(record["text"]))], True, where)
        _append_eos(tokenizer, ids, labels, True)
        return Example(ids, labels, where)
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        text = prompt + completion
        ids, labels = _tokenize_with_mask(tokenizer, text, [(len(prompt), len(text))], True, where)
        _append_eos(tokenizer, ids, labels, True)
        return Example(ids, labels, where)
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    try:
        full = render_chat(tokenizer, messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
            after = render_chat(tokenizer, messages[: i + 1])
            if not (full.startswith(before) and full.startswith(after) and len(after) >= len(before)):
                raise DataError(
                    f"{where}: the chat template does not render this conversation turn by turn (a prefix of the "
                    "conversation renders differently inside the whole), so assistant tokens cannot be located; "
                    "convert the records to prompt/completion."
                )
            spans.append((len(before), len(after)))
    except DataError:
        raise
    except Exception as exc:  # jinja raises its own types (TemplateError, exceptions raised by the template)
        raise DataError(f"{where}: the chat template cannot render this conversation ({str(exc).splitlines()[0][:160]}).") from None
    ids, labels = _tokenize_with_mask(tokenizer, full, spans, False, where)
    return Example(ids, labels, where)


# ----------------------------------------------------------------------------------- dataset build
def _pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Greedy packing in order: whole examples are concatenated until the next would not fit.

    The first label of every example after the first in a pack is dropped, so no loss is taken for
    predicting one example's first token from the previous example. Attention is not blocked between
    packed examples (plain causal attention over the pack), as in TRL's wrapped packing.
    """
    packs: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    sources: list[str] = []
    for ex in examples:
        if ids and len(ids) + len(ex) > max_seq_len:
            packs.append(Example(ids, labels, "; ".join(sources)))
            ids, labels, sources = [], [], []
        ex_labels = list(ex.labels)
        if ids:
            ex_labels[0] = IGNORE_INDEX
        ids = ids + list(ex.input_ids)
        labels = labels + ex_labels
        sources.append(ex.source)
    if ids:
        packs.append(Example(ids, labels, "; ".join(sources)))
    return packs


def build_dataset(
    records: Iterable[tuple[str, dict]], tokenizer, max_seq_len: int, truncation: bool = True, packing: bool = False
) -> TokenizedDataset:
    """Tokenize records, truncate (or refuse) long ones, drop ones left without a target, optionally pack."""
    stats = DatasetStats(packed=packing)
    examples: list[Example] = []
    for where, record in records:
        stats.records += 1
        fmt = record_format(record, where)
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        ex = encode_record(record, tokenizer, fmt, where)
        if len(ex) > max_seq_len:
            if not truncation:
                raise DataError(
                    f"{where}: the record is {len(ex)} tokens long, more than data.max_seq_len={max_seq_len}; "
                    "raise data.max_seq_len, shorten the record, or set data.truncation: true."
                )
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len], where)
            stats.truncated += 1
        # labels[0] is never a target (nothing precedes it), so a record needs a target after position 0.
        if all(lab == IGNORE_INDEX for lab in ex.labels[1:]):
            stats.dropped_no_target += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(
            f"no usable records ({stats.records} read, {stats.dropped_no_target} without any target token left after "
            f"truncation to {max_seq_len} tokens); add data or raise data.max_seq_len."
        )
    if packing:
        examples = _pack(examples, max_seq_len)
    stats.sequences = len(examples)
    stats.tokens = sum(len(e) for e in examples)
    stats.target_tokens = sum(sum(1 for lab in e.labels[1:] if lab != IGNORE_INDEX) for e in examples)
    return TokenizedDataset(examples, stats)


def split_records(records: list[tuple[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) with round(fraction * n) records (at least one) held out, chosen by a seeded shuffle."""
    n = len(records)
    n_eval = max(1, int(round(n * fraction)))
    if n_eval >= n:
        raise DataError(f"data.eval_fraction={fraction} leaves no training records out of {n}; lower it or add data.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    return train, evals


def prepare_data(config: DataConfig, tokenizer, seed: int = 0) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Train and (optional) eval datasets from the data settings: files or a split of the training file."""
    records = load_records(config.train)
    eval_records = None
    if config.eval:
        eval_records = load_records(config.eval)
    elif config.eval_fraction > 0:
        records, eval_records = split_records(records, config.eval_fraction, seed)
    train = build_dataset(records, tokenizer, config.max_seq_len, config.truncation, config.packing)
    evals = None
    if eval_records is not None:
        evals = build_dataset(eval_records, tokenizer, config.max_seq_len, config.truncation, packing=False)
    return train, evals


# ---------------------------------------------------------------------------------------- batching
def pad_id(tokenizer) -> int:
    """The id used for padding: pad, else EOS, else 0 (padding is masked, so its value never matters)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_count(labels: torch.Tensor) -> int:
    """How many positions a causal-LM loss is taken on (labels shifted by one, -100 skipped)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class BatchOrder:
    """The micro-batch order: epoch e visits the examples in a permutation seeded by (seed, e).

    The position (epoch, batch index) is all that has to be saved to continue the exact same order.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        self.n = n_examples
        self.size = micro_batch_size
        self.seed = seed
        self.epoch = epoch
        self.index = index
        self.batches_per_epoch = math.ceil(n_examples / micro_batch_size)
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=gen).tolist()
        return self._perm

    def next_indices(self) -> list[int]:
        """Example indices of the next micro-batch (the last one of an epoch may be smaller)."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        start = self.index * self.size
        self.index += 1
        return self._permutation()[start : start + self.size]

    @property
    def epochs_done(self) -> float:
        """Fractional epochs consumed so far."""
        return self.epoch + min(self.index * self.size, self.n) / self.n

    def state(self) -> dict:
        """The position to save in a checkpoint."""
        return {"epoch": self.epoch, "index": self.index, "n_examples": self.n, "micro_batch_size": self.size, "seed": self.seed}
