"""Peak resident memory of loading a sharded checkpoint in 4-bit: qlora-lite's streaming loader vs
transformers' `from_pretrained(quantization_config=BitsAndBytesConfig(...))`, each in a fresh process.

    python tools/measure_load_memory.py [--hidden 1024 --layers 12 --vocab 8192 --shard-size 100MB]

Prints peak RSS (VmHWM) above a warmed-up baseline process, the quantized model's bytes, the largest
tensor in bf16, and the ratio of the two loaders. Not a test: a benchmark, run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys, warnings
warnings.filterwarnings("ignore")
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.utils import logging
logging.disable_progress_bar()
from qlora_lite.model.loader import load_quantized

mode, path, warmup = sys.argv[1], sys.argv[2], sys.argv[3]
load_quantized(warmup, device="cpu", load_tokenizer=False)  # warm every code path on a tiny model
model_bytes = 0
if mode == "qlora":
    model, _ = load_quantized(path, device="cpu", load_tokenizer=False)
elif mode == "transformers":
    model = AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu", dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
if mode != "baseline":
    from qlora_lite.model.quant import quant_state_tensors
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        model_bytes += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            model_bytes += sum(s.numel() * s.element_size() for s in quant_state_tensors(qs))
status = open("/proc/self/status").read()
peak_kib = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1])
print(json.dumps({"peak": peak_kib * 1024, "model_bytes": model_bytes}))
"""


def run_child(mode: str, model_dir: Path, warmup_dir: Path) -> dict:
    """Run one load in a fresh interpreter and return its peak RSS and the loaded model's bytes."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(model_dir), str(warmup_dir)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_models(root: Path, hidden: int, layers: int, vocab: int, shard_size: str) -> tuple[Path, Path]:
    """A Llama-shaped model in bf16 saved in shards, and a tiny one for warm-up."""
    import torch

    from qlora_lite.model.tiny import save_tiny_model

    big = save_tiny_model(
        root / "model",
        "llama",
        dtype=torch.bfloat16,
        max_shard_size=shard_size,
        vocab_size=vocab,
        hidden_size=hidden,
        layers=layers,
        intermediate_size=hidden * 11 // 4,
        num_attention_heads=16,
        num_key_value_heads=4,
        with_tokenizer=False,
    )
    tiny = save_tiny_model(root / "tiny", "llama", with_tokenizer=False)
    return big, tiny


def largest_tensor_bf16(model_dir: Path) -> int:
    """Bytes of the checkpoint's largest tensor in bf16."""
    from qlora_lite.io.safetensors import largest_tensor_numel

    return 2 * largest_tensor_numel(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--shard-size", default="100MB")
    args = parser.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        big, tiny = make_models(Path(tmp), args.hidden, args.layers, args.vocab, args.shard_size)
        shards = len(list(big.glob("*.safetensors")))
        disk = sum(p.stat().st_size for p in big.glob("*.safetensors"))
        base = run_child("baseline", big, tiny)["peak"]
        ours = run_child("qlora", big, tiny)
        theirs = run_child("transformers", big, tiny)
        largest = largest_tensor_bf16(big)
    print(
        f"checkpoint: {shards} shards, {disk / mib:.1f} MiB bf16 on disk; largest tensor in bf16 {largest / mib:.1f} MiB"
    )
    print(f"baseline process (imports + warm-up): {base / mib:.1f} MiB peak RSS")
    for name, r in (("qlora-lite", ours), ("transformers 4-bit", theirs)):
        print(
            f"{name:>20}: peak RSS above baseline {(r['peak'] - base) / mib:7.1f} MiB; model {r['model_bytes'] / mib:.1f} MiB"
        )
    bound = ours["model_bytes"] + largest
    print(f"bound (quantized model + largest bf16 tensor): {bound / mib:.1f} MiB")
    print(
        f"ratio qlora-lite / transformers (above baseline): {(ours['peak'] - base) / max(theirs['peak'] - base, 1):.2f}"
    )


if __name__ == "__main__":
    main()
