"""Make the demo's shipped base model, `qlora_lite/demo/assets/base/`: a tiny Llama pre-trained to copy words.

    python tools/make_demo_base.py                 # writes qlora_lite/demo/assets/base/ (about 1-3 min on CPU)
    python tools/make_demo_base.py --out /tmp/base --steps 20   # a quick look elsewhere

A Llama-shaped model (hidden 64, 2 layers, the byte-level tokenizer of `qlora_lite.model.tiny`) is trained
from random weights in fp32 on the CPU for 400 AdamW steps on `copy hello = hello` (random 5-letter words),
which forms the attention head that `qlora-lite demo` then adapts with 4-bit QLoRA to shift letters. The
weights are saved in bf16 (the demo loads the base 4-bit from bf16 anyway, so its run does not change), with
config.json, the tokenizer files and `pretrain.json`: seed, steps, the copy-task eval loss (fp32 at the end of
training, of the saved bf16 weights, and of the 4-bit load the demo uses), torch / transformers versions and
the sha256 of model.safetensors, which the demo checks before copying the asset.

The run is deterministic (fixed seed, one CPU thread, `torch.use_deterministic_algorithms`): the same torch
version on the same kind of CPU writes byte-identical weights. Re-run it when the demo's base has to change:
the copy task, the model shape or tokenizer in `qlora_lite/model/tiny.py`, the pre-training recipe here, or a
torch / transformers upgrade that can no longer load the asset. Commit the whole folder it writes.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_lite.data.batching import collate  # noqa: E402
from qlora_lite.data.encode import TokenizedDataset, build_dataset  # noqa: E402
from qlora_lite.demo.base import BASE_ASSET, INFO_FILE, WEIGHTS_FILE, sha256_of  # noqa: E402
from qlora_lite.demo.task import SAMPLE_WORDS, random_words, task_record  # noqa: E402
from qlora_lite.io.atomic import atomic_dir, write_json_atomic  # noqa: E402
from qlora_lite.training.optim import AdapterOptimizer  # noqa: E402
from qlora_lite.training.step import evaluate, train_step  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def pretrain_base(steps: int = 400, seed: int = 0, progress: Callable[[int, int, float], None] | None = None):
    """Train the tiny Llama-shaped model in fp32 to copy words: (model, tokenizer, copy eval set, fp32 eval loss).

    The eval loss is about 0.001 when the copy head has formed.
    """
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.tiny import make_tokenizer, tiny_config

    tokenizer = make_tokenizer()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=64, layers=2)).float()
    # the trainer's own step and optimizer, here over every (fp32) weight: full-precision pre-training
    opt = AdapterOptimizer(model.parameters(), "adamw", lr=6e-3, betas=(0.9, 0.98), weight_decay=0.0)
    evals = build_dataset(
        [("copy", task_record("copy", w)) for w in random_words(rng, 64, set(SAMPLE_WORDS))], tokenizer, 32
    )
    model.train()
    for step in range(steps):
        lr = 6e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        records = [("copy", task_record("copy", w)) for w in random_words(rng, 32, set(SAMPLE_WORDS))]
        batch = collate(build_dataset(records, tokenizer, 32).examples, 0)
        result = train_step(model, opt, [batch], torch.device("cpu"), bf16=False, max_grad_norm=1.0, lr=lr)
        if progress is not None:
            progress(step + 1, steps, result.loss)
    copy_loss, _ = evaluate(model, evals, 64, 0, torch.device("cpu"), bf16=False)
    return model, tokenizer, evals, copy_loss


def saved_losses(model_dir: Path, evals: TokenizedDataset) -> tuple[float, float]:
    """Copy-task eval loss of the saved weights loaded in fp32, and loaded 4-bit (NF4) as the demo loads them."""
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.loader import load_quantized

    saved = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loss_saved, _ = evaluate(saved, evals, 64, 0, torch.device("cpu"), bf16=False)
    quantized, tokenizer = load_quantized(model_dir, bits=4, quant_type="nf4", double_quant=True, device="cpu")
    loss_4bit, _ = evaluate(quantized, evals, 64, tokenizer.pad_token_id, torch.device("cpu"))
    return loss_saved, loss_4bit


def make_base(
    out_dir: Path, steps: int = 400, seed: int = 0, dtype: str = "bfloat16", threads: int = 1, log=print
) -> dict:
    """Pre-train deterministically and write the asset folder atomically; returns what `pretrain.json` records."""
    started = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        if step % 50 == 0 or step == total:
            log(f"step {step}/{total}: loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")

    # set for the run, restored after (a caller such as the tests keeps its own settings and random state)
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.random.get_rng_state()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _make_base(out_dir, steps, seed, dtype, threads, log, progress, started)
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
        torch.random.set_rng_state(previous[2])


def _make_base(out_dir: Path, steps: int, seed: int, dtype: str, threads: int, log, progress, started: float) -> dict:
    """`make_base` under its thread and determinism settings."""
    import tokenizers
    import transformers

    model, tokenizer, evals, loss_fp32 = pretrain_base(steps, seed, progress)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        loss_saved, loss_4bit = saved_losses(tmp, evals)
        info = {
            "made_by": "tools/make_demo_base.py",
            "model": "llama, hidden 64, 2 layers, byte-level tokenizer (qlora_lite.model.tiny)",
            "task": "copy 5-letter words: 'copy hello =' -> ' hello'",
            "seed": seed,
            "steps": steps,
            "dtype": dtype,
            "threads": threads,
            "copy_eval_loss": loss_saved,
            "copy_eval_loss_fp32": loss_fp32,
            "copy_eval_loss_4bit": loss_4bit,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "sha256": sha256_of(tmp / WEIGHTS_FILE),
        }
        write_json_atomic(tmp / INFO_FILE, info)
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
    log(
        f"{out_dir}: copy eval loss {loss_saved:.4f} ({dtype}), {loss_fp32:.4f} (fp32), {loss_4bit:.4f} (4-bit); "
        f"{sum(f.stat().st_size for f in out_dir.iterdir()) / 1024:.0f} KiB in {time.perf_counter() - started:.0f} s"
    )
    return info


def main(argv: list[str] | None = None) -> int:
    """Command line: --out, --steps, --seed, --dtype, --threads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BASE_ASSET, help="folder to write (default: the package asset)")
    parser.add_argument("--steps", type=int, default=400, help="pre-training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the saved weights")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the weights depend on it)")
    args = parser.parse_args(argv)
    make_base(args.out, args.steps, args.seed, args.dtype, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
