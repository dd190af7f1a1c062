"""The offline quick start: 4-bit QLoRA teaches a tiny shipped base model a Caesar shift.

1. The base is a tiny Llama-shaped model (hidden 64, 2 layers, byte-level tokenizer) shipped with the package
   (`assets/base/`, made by `tools/make_demo_base.py`): pre-trained in full precision to copy 5-letter words
   (`copy hello = hello`), which gives it a real skill, an attention head that finds the letter to copy.
   Random weights would give LoRA nothing to adapt. It is copied into the demo folder and loaded 4-bit
   (NF4, double quantization).
2. LoRA adapters are trained on a generated task the base cannot do, shifting each letter by one
   (`shift hello = ifmmp`), through the same `train()` as `qlora-lite train`.
3. Eval loss, exact-match accuracy and a few greedy generations are measured before and after, and the
   adapter is merged into fp16 weights with `export_merged`.

Nothing here prints; `cli._cmd_demo` renders the returned `DemoResult`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config.load import config_from_dict
from ..config.settings import TrainConfig
from ..data.encode import build_dataset
from ..errors import ConfigError, QloraLiteError
from ..io.atomic import write_json_atomic
from ..training.loop import train
from ..training.reporter import Reporter, TrainResult
from ..training.step import evaluate
from .base import install_base
from .task import SAMPLE_WORDS, accuracy, greedy_answers, shift_word, task_record, write_task_data

MARKER = "demo.json"


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


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(f"{out} is not empty and was not made by the demo; choose another --out folder.")
        for name in ("base-model", "data", "run", "merged"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MARKER, {"status": "running"})


def demo_config(
    base_dir: Path, data_dir: Path, run_dir: Path, steps: int, seed: int, adapter_dtype: str = "bfloat16"
) -> TrainConfig:
    """The demo's training config: 4-bit NF4 base, r=16 adapters on every linear layer, cosine schedule."""
    return config_from_dict(
        {
            "model": str(base_dir),
            "output_dir": str(run_dir),
            "quant": {"bits": 4, "quant_type": "nf4", "double_quant": True},
            "lora": {
                "r": 16,
                "alpha": 32,
                "dropout": 0.0,
                "target_modules": "all-linear",
                "adapter_dtype": adapter_dtype,
            },
            "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "max_seq_len": 32},
            "train": {
                "max_steps": steps,
                "micro_batch_size": 16,
                "grad_accum": 1,
                "lr": 5e-3,
                "warmup_steps": 5,
                "schedule": "cosine",
                "optimizer": "paged_adamw_8bit",
                "gradient_checkpointing": True,
                "seed": seed,
                "log_every": 5,
                "eval_every": 20,
                "save_every": 40,
                "keep_checkpoints": 2,
            },
        }
    )


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (None: leave the setting alone), restoring it after."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    reporter: Reporter | None = None,
    on_stage: Callable[[str], None] | None = None,
    train_steps: int = 80,
    adapter_dtype: str = "bfloat16",
    seed: int = 0,
    export: bool = True,
    threads: int | None = 1,
) -> DemoResult:
    """Run the whole quick start in `out_dir` (base-model/, data/, run/, merged/, demo.json) and return the figures.

    `threads` torch threads are used (None: torch's setting). 1 by default: at hidden size 64 each op is too
    small to share well; on an idle 2-core machine 2 threads saved under a second of the ~4 s run, but on a
    busy one their synchronisation made it 5-10 times slower (96 s against 17 s for the whole command).
    """
    with torch_threads(threads):
        return _run(Path(out_dir), reporter, on_stage or (lambda _msg: None), train_steps, adapter_dtype, seed, export)


def _run(
    out: Path,
    reporter: Reporter | None,
    stage: Callable[[str], None],
    train_steps: int,
    adapter_dtype: str,
    seed: int,
    export: bool,
) -> DemoResult:
    """`run_demo`'s stages: install the base, write the data, measure, train, measure, merge, write demo.json."""
    from ..export.adapter_load import load_adapter
    from ..model.loader import load_quantized

    started = time.perf_counter()
    timings: dict[str, float] = {}
    _prepare_out_dir(out)
    base_dir, data_dir, run_dir = out / "base-model", out / "data", out / "run"

    t = time.perf_counter()
    info = install_base(base_dir)
    copy_loss = float(info["copy_eval_loss"])
    stage(f"base: shipped tiny model (copy task, loss {copy_loss:.4f})")
    timings["base"] = time.perf_counter() - t

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
    acc_before = accuracy(greedy_answers(model, tokenizer, prompts), expected)
    before = greedy_answers(model, tokenizer, sample_prompts)
    timings["measure_before"] = time.perf_counter() - t

    stage(f"training LoRA adapters on the 4-bit base: {train_steps} steps of 'shift' (each letter one on)")
    t = time.perf_counter()
    result = train(config, reporter=reporter)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    load_adapter(model, result.adapter_dir)
    acc_after = accuracy(greedy_answers(model, tokenizer, prompts), expected)
    after = greedy_answers(model, tokenizer, sample_prompts)
    timings["measure_after"] = time.perf_counter() - t
    samples = [Sample(p, e, b, a) for p, e, b, a in zip(sample_prompts, sample_expected, before, after)]

    merged_dir, merge_note = None, None
    if export:
        merged_dir, merge_note = _try_merge(base_dir, result.adapter_dir, out / "merged", samples, stage, timings)

    demo = DemoResult(
        out_dir=out,
        base_dir=base_dir,
        run_dir=run_dir,
        pretrain_steps=int(info["steps"]),
        pretrain_copy_loss=copy_loss,
        eval_loss_before=loss_before,
        eval_loss_after=float(result.eval_loss),
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        samples=samples,
        train=result,
        merged_dir=merged_dir,
        merge_note=merge_note,
        seconds=time.perf_counter() - started,
        timings=timings,
    )
    summary = {k: v for k, v in asdict(demo).items() if k not in ("train",)}
    summary["train_steps"] = result.steps
    write_json_atomic(out / MARKER, json.loads(json.dumps(summary, default=str)))
    return demo


def _try_merge(
    base_dir: Path, adapter_dir: Path, merged: Path, samples: list[Sample], stage: Callable[[str], None], timings: dict
) -> tuple[Path | None, str | None]:
    """Merge with `export_merged` and answer the samples with the merged fp16 model; (None, why) if the export fails."""
    from transformers import AutoModelForCausalLM

    from ..export.hf_dir import export_merged
    from ..model.loader import load_tokenizer_from
    from ..model.tiny import make_tokenizer

    stage("merging the adapter into fp16 weights and answering with plain transformers")
    t = time.perf_counter()
    try:
        path = Path(export_merged(base_dir, adapter_dir, merged, dtype="float16"))
    except QloraLiteError as exc:
        return None, f"merged export failed: {exc}"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = load_tokenizer_from(path) or make_tokenizer()
    answers = greedy_answers(model, tokenizer, [s.prompt for s in samples])
    for s, a in zip(samples, answers):
        s.merged = a
    timings["merge"] = time.perf_counter() - t
    return path, None
