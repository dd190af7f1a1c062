"""The tokenizer as llama.cpp reads it from a GGUF file: vocabulary, merges or scores, token types, special ids.

Read from the tokenizer files an export carries (the adapter dir's when it holds them: they have the chat template
training used; else the base's) through transformers' fast tokenizer, the way llama.cpp's `convert_hf_to_gguf.py`
reads them:

- byte-level BPE (GPT-2, Llama 3, Qwen2): `tokenizer.ggml.model` "gpt2", the merges, and the pre-tokenizer llama.cpp
  must split text with (`tokenizer.ggml.pre`), recognised from the tokenizer's own split pattern;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma as `tokenizer.json`): "llama", with scores
  that rank every merged piece as the merges do (llama.cpp merges the best-scored pair first).

Anything else (Unigram, WordPiece, a pre-tokenizer llama.cpp does not know) is refused before a file is written: a
GGUF that tokenizes differently from training would still load and quietly produce other tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExportError

# The split patterns of the byte-level BPE tokenizers llama.cpp knows, as tokenizer.json writes them, by the
# pre-tokenizer name llama.cpp gives them.
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}

# gguf.TokenType values (kept here so this module imports without the gguf package)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"


@dataclass
class GgufVocab:
    """Everything the GGUF's `tokenizer.ggml.*` keys hold."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str  # llama.cpp's pre-tokenizer name
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad (and eot when set)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | dict | None = None
    token_texts: dict[str, int] = field(default_factory=dict)  # special token text -> id (for the Modelfile)


def _refuse(where: Path, what: str) -> ExportError:
    return ExportError(
        f"the tokenizer in {where} is {what}, which llama.cpp cannot reproduce from a GGUF file; "
        "export with --format hf instead."
    )


def load_tokenizer(where: Path):
    """transformers' fast tokenizer from `where` (ExportError when it cannot be read or is a slow one)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError, TypeError) as exc:
        raise ExportError(
            f"the tokenizer in {where} cannot be read ({str(exc).splitlines()[0][:160]}); fix or re-save its tokenizer files."
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise _refuse(where, "a slow (Python) tokenizer without tokenizer.json")
    return tokenizer


def _split_pattern(pre: dict | None) -> tuple[str | None, bool]:
    """(the Split regex, whether a ByteLevel step splits with GPT-2's own regex) of a pre_tokenizer description."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    pattern, gpt2_regex = None, False
    for step in steps or []:
        if step.get("type") == "Split":
            pattern = (step.get("pattern") or {}).get("Regex", pattern)
        elif step.get("type") == "ByteLevel":
            gpt2_regex = gpt2_regex or bool(step.get("use_regex", True))
    return pattern, gpt2_regex


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf's `does_token_look_special`: added tokens written like control tokens are controls."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or text.startswith(("<start_of_", "<end_of_"))
    )


def _byte_level(tokenizer, spec: dict, where: Path, vocab_size: int) -> GgufVocab:
    merges = spec["model"].get("merges") or []
    pattern, gpt2_regex = _split_pattern(spec.get("pre_tokenizer"))
    if pattern is not None:
        pre = KNOWN_SPLITS.get(pattern)
        if pre is None:
            raise _refuse(where, f"a byte-level BPE that splits text with the pattern {pattern[:60]!r}")
    elif gpt2_regex:
        pre = "gpt-2"
    elif not merges:
        pre = "default"  # no merges: every byte is its own token however the text is split
    else:
        raise _refuse(where, "a byte-level BPE that does not split its input into words")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise _refuse(where, f"a BPE with a {normalizer} normalizer")
    added = tokenizer.added_tokens_decoder
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        if i in added:
            token = added[i]
            if not token.normalized:  # llama.cpp takes added tokens as they appear in text
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            types.append(CONTROL if token.special or _looks_special(text) else USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)
    # tokenizers writes merges as pairs since 0.20; llama.cpp reads "left right", a space inside written as U+0120
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    merge_lines = [" ".join("".join("\u0120" if c == " " else c for c in part) for part in p) for p in pairs]
    return GgufVocab("gpt2", pre, tokens, types, merges=merge_lines)


def _sentencepiece_like(tokenizer, spec: dict, where: Path, vocab_size: int) -> GgufVocab:
    merges = spec["model"].get("merges") or []
    vocab = tokenizer.get_vocab()
    # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores best: score each piece by
    # the rank of the merge that makes it, so it merges in the order of tokenizer.json's merges
    scores = [0.0] * vocab_size
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is not None and token_id < vocab_size and scores[token_id] == 0.0:
            scores[token_id] = -float(rank + 1)
    added = tokenizer.added_tokens_decoder
    unk = spec["model"].get("unk_token")
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif text == unk:
            types.append(UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(BYTE)
        elif i in added:
            special = added[i].special or _looks_special(text)
            text = text if special else text.replace(SPIECE_SPACE, " ")
            types.append(CONTROL if special else USER_DEFINED)
        else:
            types.append(NORMAL)
        if text is not None:
            tokens.append(text)
    steps = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    space_prefix = '"Prepend"' in steps or ('"Metaspace"' in steps and '"prepend_scheme": "never"' not in steps)
    return GgufVocab("llama", "default", tokens, types, scores=scores, add_space_prefix=space_prefix)


def _special_ids(tokenizer, model_config: dict, vocab_size: int) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if value is None:
            value = model_config.get(f"{kind}_token_id")
            value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and 0 <= value < vocab_size:
            ids[kind] = value
    return ids


def read_vocab(where: Path, vocab_size: int, model_config: dict, tokenizer=None) -> GgufVocab:
    """The GGUF vocabulary of the tokenizer in `where`, padded to the model's `vocab_size` rows (unused entries).

    Raises `ExportError` for a tokenizer llama.cpp cannot reproduce, or one with more tokens than the model has rows.
    """
    tokenizer = tokenizer or load_tokenizer(where)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if len(tokenizer) > vocab_size:
        raise ExportError(
            f"the tokenizer in {where} has {len(tokenizer)} tokens but the model only {vocab_size} embedding rows; "
            "the tokenizer belongs to another model."
        )
    if model.get("type") != "BPE":
        raise _refuse(where, f"a {model.get('type') or 'unknown'} tokenizer")
    if model.get("byte_fallback"):
        vocab = _sentencepiece_like(tokenizer, spec, where, vocab_size)
    elif "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")]):
        vocab = _byte_level(tokenizer, spec, where, vocab_size)
    else:
        raise _refuse(where, "a BPE that is neither byte-level nor with byte fallback")
    vocab.special_ids = _special_ids(tokenizer, model_config, vocab_size)
    probe, plain = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    bos, eos = vocab.special_ids.get("bos"), vocab.special_ids.get("eos")
    vocab.add_bos = bos is not None and len(probe) > len(plain) and probe[0] == bos
    vocab.add_eos = eos is not None and len(probe) > len(plain) and probe[-1] == eos
    vocab.chat_template = getattr(tokenizer, "chat_template", None) or None
    vocab.token_texts = {str(t): i for i, t in tokenizer.added_tokens_decoder.items() if i < vocab_size}
    return vocab


def add_vocab(writer, vocab: GgufVocab) -> None:
    """Write the vocabulary's keys with a `gguf.GGUFWriter`."""
    import gguf

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.model == "gpt2":  # llama.cpp refuses a BPE vocabulary without the merges key, even an empty one
        writer.add_key_value(
            gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
        )
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    template = vocab.chat_template
    if isinstance(template, dict):  # several named templates: gguf stores the default and the others by name
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


__all__ = ["GgufVocab", "read_vocab", "add_vocab", "load_tokenizer", "KNOWN_SPLITS"]
