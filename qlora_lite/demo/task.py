"""The demo's word tasks and how a model is scored on them: records, data files, greedy answers, accuracy.

Two tasks on random 5-letter words: `copy hello =` -> ` hello` (what the shipped base was pre-trained on,
see `tools/make_demo_base.py`) and `shift hello =` -> ` ifmmp` (each letter one on, what QLoRA teaches).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..io.atomic import write_text_atomic

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
WORD_LEN = 5
SAMPLE_WORDS = ("hello", "world", "adapt", "quant", "zebra")


def shift_word(word: str) -> str:
    """Each letter moved one place on in the alphabet, z wrapping to a."""
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % 26] for c in word)


def task_record(task: str, word: str) -> dict:
    """A prompt/completion record: `copy hello =` -> ` hello`, `shift hello =` -> ` ifmmp`."""
    answer = word if task == "copy" else shift_word(word)
    return {"prompt": f"{task} {word} =", "completion": f" {answer}"}


def random_words(rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    """`n` random lowercase words of `WORD_LEN` letters drawn from `rng`, none of them in `exclude`."""
    words: list[str] = []
    while len(words) < n:
        w = "".join(rng.choice(ALPHABET) for _ in range(WORD_LEN))
        if w not in exclude:
            words.append(w)
    return words


def write_task_data(data_dir: Path, seed: int, n_train: int = 512, n_eval: int = 64) -> list[str]:
    """The shift task as train.jsonl / eval.jsonl (eval words unseen in training); returns the eval words."""
    rng = random.Random(seed + 1)
    train_words = random_words(rng, n_train, set(SAMPLE_WORDS))
    eval_words = random_words(rng, n_eval, set(SAMPLE_WORDS) | set(train_words))
    for name, words in (("train.jsonl", train_words), ("eval.jsonl", eval_words)):
        write_text_atomic(data_dir / name, "".join(json.dumps(task_record("shift", w)) + "\n" for w in words))
    return eval_words


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = WORD_LEN + 2
) -> list[str]:
    """Greedy continuations of each prompt up to EOS (prompts of equal token length are batched)."""
    model.eval()
    device = next(p.device for p in model.parameters())
    encoded = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    answers: dict[int, str] = {}
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for idxs in by_len.values():
        ids = torch.tensor([encoded[i] for i in idxs], device=device)
        start = ids.shape[1]
        done = torch.zeros(len(idxs), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tokenizer.eos_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == tokenizer.eos_token_id
            if bool(done.all()):
                break
        for row, i in enumerate(idxs):
            out = ids[row, start:].tolist()
            if tokenizer.eos_token_id in out:
                out = out[: out.index(tokenizer.eos_token_id)]
            answers[i] = tokenizer.decode(out).strip()
    return [answers[i] for i in range(len(prompts))]


def accuracy(answers: list[str], expected: list[str]) -> float:
    """The fraction of answers equal to the expected ones."""
    return sum(a == e for a, e in zip(answers, expected)) / len(expected)
