"""The offline quick start: a tiny model learns to copy words, then 4-bit QLoRA teaches it a Caesar shift.

1. A tiny Llama-shaped model (hidden 64, 2 layers, byte-level tokenizer) is pre-trained in full precision
   to copy 5-letter words (`copy hello = hello`). That gives the base a real skill: an attention head that
   finds the letter to copy. Random weights would give LoRA nothing to adapt.
2. The base is saved as a Hugging Face directory and loaded back 4-bit (NF4, double quantization).
3. LoRA adapters are trained on a generated task the base cannot do, shifting each letter by one
   (`shift hello = ifmmp`), through the same `train()` as `qlora-lite train`.
4. Eval loss, exact-match accuracy and a few greedy generations are measured before and after, and the
   adapter is merged into fp16 weights when `export.export_merged` is available.

Nothing here prints; `cli._cmd_demo` renders the returned `DemoResult`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config.settings import config_from_dict
from ..data.dataset import build_dataset, collate
from ..errors import ConfigError, QloraLiteError
from ..io.atomic import atomic_dir, write_json_atomic, write_text_atomic
from ..training.loss import causal_lm_loss
from ..training.loop import Reporter, TrainResult, evaluate, train

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
WORD_LEN = 5
SAMPLE_WORDS = ("hello", "world", "adapt", "quant", "zebra")
MARKER = "demo.json"


def shift_word(word: str) -> str:
    """Each letter moved one place on in the alphabet, z wrapping to a."""
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % 26] for c in word)


def task_record(task: str, word: str) -> dict:
    """A prompt/completion record: `copy hello =` -> ` hello`, `shift hello =` -> ` ifmmp`."""
    answer = word if task == "copy" else shift_word(word)
    return {"prompt": f"{task} {word} =", "completion": f" {answer}"}


def _random_words(rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        w = "".join(rng.choice(ALPHABET) for _ in range(WORD_LEN))
        if w not in exclude:
            words.append(w)
    return words


@dataclass
class Sample:
    """One prompt with the expected answer and the model's greedy answers."""

    prompt: str
    expected: str
    before: str
    after: str
    merged: str | None = None


@dataclass
class DemoResult:
    """Everything the demo measured."""

    out_dir: Path
    base_dir: Path
    run_dir: Path
    pretrain_steps: int
    pretrain_copy_loss: float
    eval_loss_before: float
    eval_loss_after: float
    accuracy_before: float
    accuracy_after: float
    samples: list[Sample]
    train: TrainResult
    merged_dir: Path | None = None
    merge_note: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- pretraining
def pretrain_base(
    out_dir: Path, steps: int = 400, seed: int = 0, progress: Callable[[int, int, float], None] | None = None
) -> float:
    """Train a tiny Llama-shaped model in fp32 to copy words; save it (HF layout, safetensors) atomically.

    Returns the copy task's eval loss (about 0.005 when the copy head has formed).
    """
    from transformers import AutoModelForCausalLM

    from ..model.tiny import make_tokenizer, tiny_config

    tokenizer = make_tokenizer()
    rng = random.Random(seed)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=64, layers=2)).float()
    finally:
        torch.random.set_rng_state(generator_state)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3, betas=(0.9, 0.98), weight_decay=0.0)
    evals = build_dataset([("copy", task_record("copy", w)) for w in _random_words(rng, 64, set(SAMPLE_WORDS))], tokenizer, 32)
    model.train()
    for step in range(steps):
        lr = 6e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        records = [("copy", task_record("copy", w)) for w in _random_words(rng, 32, set(SAMPLE_WORDS))]
        batch = collate(build_dataset(records, tokenizer, 32).examples, 0)
        loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, steps, float(loss))
    copy_loss, _ = evaluate(model, evals, 64, 0, torch.device("cpu"), bf16=False)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return copy_loss


# -------------------------------------------------------------------------------------- generation
@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = WORD_LEN + 2) -> list[str]:
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


def _accuracy(answers: list[str], expected: list[str]) -> float:
    return sum(a == e for a, e in zip(answers, expected)) / len(expected)


# ---------------------------------------------------------------------------------------------- run
def _prepare_out_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(f"{out} is not empty and was not made by the demo; choose another --out folder.")
        for name in ("base-model", "data", "run", "merged"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MARKER, {"status": "running"})


def demo_config(base_dir: Path, data_dir: Path, run_dir: Path, steps: int, seed: int, adapter_dtype: str = "bfloat16"):
    """The demo's training config: 4-bit NF4 base, r=16 adapters on every linear layer, cosine schedule."""
    return config_from_dict({
        "model": str(base_dir),
        "output_dir": str(run_dir),
        "quant": {"bits": 4, "quant_type": "nf4", "double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear", "adapter_dtype": adapter_dtype},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "max_seq_len": 32},
        "train": {
            "max_steps": steps, "micro_batch_size": 16, "grad_accum": 1, "lr": 5e-3, "warmup_steps": 5,
            "schedule": "cosine", "optimizer": "paged_adamw_8bit", "gradient_checkpointing": True, "seed": seed,
            "log_every": 5, "eval_every": 20, "save_every": 40, "keep_checkpoints": 2,
        },
    })


def write_task_data(data_dir: Path, seed: int, n_train: int = 512, n_eval: int = 64) -> list[str]:
    """The shift task as train.jsonl / eval.jsonl (eval words unseen in training); returns the eval words."""
    rng = random.Random(seed + 1)
    train_words = _random_words(rng, n_train, set(SAMPLE_WORDS))
    eval_words = _random_words(rng, n_eval, set(SAMPLE_WORDS) | set(train_words))
    for name, words in (("train.jsonl", train_words), ("eval.jsonl", eval_words)):
        write_text_atomic(data_dir / name, "".join(json.dumps(task_record("shift", w)) + "\n" for w in words))
    return eval_words


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    reporter: Reporter | None = None,
    on_stage: Callable[[str], None] | None = None,
    pretrain_progress: Callable[[int, int, float], None] | None = None,
    pretrain_steps: int = 400,
    train_steps: int = 80,
    adapter_dtype: str = "bfloat16",
    seed: int = 0,
    export: bool = True,
) -> DemoResult:
    """Run the whole quick start in `out_dir` (base-model/, data/, run/, merged/, demo.json) and return the figures."""
    from ..export.merge import load_adapter
    from ..model.loader import load_quantized

    stage = on_stage or (lambda _msg: None)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out_dir)
    _prepare_out_dir(out)
    base_dir, data_dir, run_dir = out / "base-model", out / "data", out / "run"

    stage("pre-training a tiny Llama-shaped model (hidden 64, 2 layers) to copy words, in full precision")
    t = time.perf_counter()
    copy_loss = pretrain_base(base_dir, pretrain_steps, seed, pretrain_progress)
    timings["pretrain"] = time.perf_counter() - t

    eval_words = write_task_data(data_dir, seed)
    prompts = [task_record("shift", w)["prompt"] for w in eval_words]
    expected = [shift_word(w) for w in eval_words]
    sample_prompts = [task_record("shift", w)["prompt"] for w in SAMPLE_WORDS]
    sample_expected = [shift_word(w) for w in SAMPLE_WORDS]
    config = demo_config(base_dir, data_dir, run_dir, train_steps, seed, adapter_dtype)

    stage("loading the base 4-bit (NF4) and measuring it on the shift task")
    t = time.perf_counter()
    model, tokenizer = load_quantized(base_dir, bits=4, quant_type="nf4", double_quant=True, device="cpu")
    eval_set = build_dataset([(w, task_record("shift", w)) for w in eval_words], tokenizer, 32)
    loss_before, _ = evaluate(model, eval_set, 16, tokenizer.pad_token_id, torch.device("cpu"))
    acc_before = _accuracy(greedy_answers(model, tokenizer, prompts), expected)
    before = greedy_answers(model, tokenizer, sample_prompts)
    timings["measure_before"] = time.perf_counter() - t

    stage(f"training LoRA adapters on the 4-bit base: {train_steps} steps of 'shift' (each letter one on)")
    t = time.perf_counter()
    result = train(config, reporter=reporter)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    load_adapter(model, result.adapter_dir)
    acc_after = _accuracy(greedy_answers(model, tokenizer, prompts), expected)
    after = greedy_answers(model, tokenizer, sample_prompts)
    timings["measure_after"] = time.perf_counter() - t
    samples = [Sample(p, e, b, a) for p, e, b, a in zip(sample_prompts, sample_expected, before, after)]

    merged_dir, merge_note = None, None
    if export:
        merged_dir, merge_note = _try_merge(base_dir, result.adapter_dir, out / "merged", samples, stage, timings)

    demo = DemoResult(
        out_dir=out, base_dir=base_dir, run_dir=run_dir, pretrain_steps=pretrain_steps, pretrain_copy_loss=copy_loss,
        eval_loss_before=loss_before, eval_loss_after=float(result.eval_loss), accuracy_before=acc_before,
        accuracy_after=acc_after, samples=samples, train=result, merged_dir=merged_dir, merge_note=merge_note,
        seconds=time.perf_counter() - started, timings=timings,
    )
    summary = {k: v for k, v in asdict(demo).items() if k not in ("train",)}
    summary["train_steps"] = result.steps
    write_json_atomic(out / MARKER, json.loads(json.dumps(summary, default=str)))
    return demo


def _try_merge(base_dir: Path, adapter_dir: Path, merged: Path, samples: list[Sample], stage, timings: dict) -> tuple[Path | None, str | None]:
    """Merge with `export.export_merged` when this build has it, and answer the samples with the merged fp16 model."""
    from ..export import merge as export_module

    if not hasattr(export_module, "export_merged"):
        return None, "merged export is not available in this build"
    stage("merging the adapter into fp16 weights and answering with plain transformers")
    t = time.perf_counter()
    try:
        path = Path(export_module.export_merged(base_dir, adapter_dir, merged, dtype="float16"))
    except QloraLiteError as exc:
        return None, f"merged export failed: {exc}"
    from transformers import AutoModelForCausalLM

    from ..model.loader import load_tokenizer_from
    from ..model.tiny import make_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = load_tokenizer_from(path) or make_tokenizer()
    answers = greedy_answers(model, tokenizer, [s.prompt for s in samples])
    for s, a in zip(samples, answers):
        s.merged = a
    timings["merge"] = time.perf_counter() - t
    return path, None
