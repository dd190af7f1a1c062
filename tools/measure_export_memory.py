"""Peak resident memory of a merged export: qlora-lite's streamed `export_merged` vs peft's route
(transformers fp16 base + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`), each in a
fresh process, measured from outside through /proc/<pid>.

    python tools/measure_export_memory.py [--hidden 1024 --layers 12 --vocab 8192 --shard-size 100MB --out-shard-size 100MB]

Each child first runs its route once on a tiny model, so imports and lazily built code paths are paid before
the measured run, then waits. The parent resets the child's peak-RSS counter (`5` into /proc/<pid>/clear_refs),
reads its resident size as the baseline, lets it run the real export, and reads VmHWM when it is done.
(ru_maxrss is not used: Linux carries the forking parent's resident size over exec into the child's maximum.)
Prints the peak above baseline for both routes next to the bound the streamed export promises (largest
output shard + largest tensor in fp32 + a fixed overhead). Not a test: a benchmark, run it by hand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import os, sys, warnings
warnings.filterwarnings("ignore")
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers.utils import logging
logging.disable_progress_bar()
logging.set_verbosity_error()

mode, base, adapter, out, shard, tiny_base, tiny_adapter = sys.argv[1:8]

def qlora(base, adapter, out):
    from qlora_lite.export.hf_dir import export_merged
    export_merged(base, adapter, out, "float16", max_shard_size=shard, device="cpu")

def peft(base, adapter, out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size=shard)

route = qlora if mode == "qlora" else peft
route(tiny_base, tiny_adapter, out + "-warmup")
print("warm", flush=True)
sys.stdin.readline()  # the parent resets our peak counter and reads the baseline now
route(base, adapter, out)
print("done", flush=True)
sys.stdin.read()  # stay alive until the parent has read our peak
"""


def run_child(mode: str, base: Path, adapter: Path, out: Path, shard: str, tiny: tuple[Path, Path]) -> tuple[int, int]:
    """Run one export route ("qlora" or "peft") in a fresh interpreter; returns (baseline RSS, peak RSS) in bytes."""
    argv = [sys.executable, "-c", CHILD, mode, str(base), str(adapter), str(out), shard, str(tiny[0]), str(tiny[1])]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, env=env)
        baseline = peak = 0
        if proc.stdout.readline().strip() == b"warm":
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            baseline = proc_status(proc.pid, "VmRSS")
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            if proc.stdout.readline().strip() == b"done":
                peak = proc_status(proc.pid, "VmHWM")
        proc.communicate(b"")
        if not peak or proc.returncode != 0:
            errors.seek(0)
            raise RuntimeError(
                f"{mode} child failed ({proc.returncode}):\n{errors.read().decode(errors='replace')[-3000:]}"
            )
    return baseline, peak


def proc_status(pid: int, field: str) -> int:
    """A memory field (VmRSS, VmHWM) of a live process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field + ":")).split()[1]) * 1024


def make_adapter(base_dir: Path, out_dir: Path, r: int = 16, seed: int = 0) -> Path:
    """A random LoRA adapter (all-linear, B != 0) for a base, built on a meta skeleton without loading weights."""
    import torch

    from qlora_lite.config.settings import QuantConfig
    from qlora_lite.export.adapter import save_adapter
    from qlora_lite.model.loader import build_skeleton, load_config
    from qlora_lite.model.lora import apply_lora, lora_layers

    model = build_skeleton(load_config(base_dir))
    model.config.name_or_path = str(base_dir)
    apply_lora(model, r=r, alpha=2 * r, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.02)
    model.qlora_quant = QuantConfig()
    model.qlora_targets = sorted(lora_layers(model))
    return save_adapter(model, out_dir)


def make_models(root: Path, hidden: int, layers: int, vocab: int, shard_size: str) -> dict[str, Path]:
    """A Llama-shaped bf16 model saved in shards with an adapter, and a tiny pair for warm-up."""
    import torch

    from qlora_lite.model.tiny import save_tiny_model

    big = save_tiny_model(
        root / "model", "llama", dtype=torch.bfloat16, max_shard_size=shard_size, vocab_size=vocab,
        hidden_size=hidden, layers=layers, intermediate_size=hidden * 11 // 4, num_attention_heads=16,
        num_key_value_heads=4, with_tokenizer=False,
    )  # fmt: skip
    tiny = save_tiny_model(root / "tiny", "llama", with_tokenizer=False)
    return {
        "base": big,
        "adapter": make_adapter(big, root / "adapter"),
        "tiny_base": tiny,
        "tiny_adapter": make_adapter(tiny, root / "tiny-adapter"),
    }


def largest_tensor_fp32(model_dir: Path) -> int:
    """Bytes of the checkpoint's largest tensor in fp32."""
    from qlora_lite.io.safetensors import largest_tensor_numel

    return 4 * largest_tensor_numel(model_dir)


def largest_file(model_dir: Path) -> int:
    """Bytes of the largest .safetensors file in a dir."""
    return max(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def measure(root: Path, models: dict[str, Path], out_shard_size: str) -> dict[str, int]:
    """Peak RSS above the warmed-up baseline for both routes, and the sizes the bound is made of."""
    tiny = (models["tiny_base"], models["tiny_adapter"])
    result = {}
    for mode in ("qlora", "peft"):
        baseline, peak = run_child(mode, models["base"], models["adapter"], root / f"out-{mode}", out_shard_size, tiny)
        result[mode], result[f"{mode}_baseline"] = peak - baseline, baseline
    out = root / "out-qlora"
    result.update(
        largest_shard=largest_file(out),
        largest_tensor_fp32=largest_tensor_fp32(models["base"]),
        output_bytes=sum(p.stat().st_size for p in out.glob("*.safetensors")),
        output_shards=len(list(out.glob("*.safetensors"))),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--shard-size", default="100MB", help="shard size of the generated base checkpoint")
    parser.add_argument("--out-shard-size", default="100MB", help="max shard size of both exports")
    args = parser.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = make_models(root, args.hidden, args.layers, args.vocab, args.shard_size)
        disk = sum(p.stat().st_size for p in models["base"].glob("*.safetensors"))
        shards = len(list(models["base"].glob("*.safetensors")))
        m = measure(root, models, args.out_shard_size)
    print(
        f"base checkpoint: {shards} shards, {disk / mib:.1f} MiB bf16; merged fp16 output {m['output_bytes'] / mib:.1f} MiB in {m['output_shards']} shards"
    )
    print(
        f"largest output shard {m['largest_shard'] / mib:.1f} MiB; largest tensor in fp32 {m['largest_tensor_fp32'] / mib:.1f} MiB"
    )
    print(
        f"baselines after warm-up: qlora-lite {m['qlora_baseline'] / mib:.1f} MiB, peft {m['peft_baseline'] / mib:.1f} MiB RSS"
    )
    print(f"{'qlora-lite export_merged':>34}: {m['qlora'] / mib:8.1f} MiB peak RSS above baseline")
    print(f"{'peft merge_and_unload + save':>34}: {m['peft'] / mib:8.1f} MiB peak RSS above baseline")
    print(
        f"bound (largest shard + largest fp32 tensor): {(m['largest_shard'] + m['largest_tensor_fp32']) / mib:.1f} MiB + fixed overhead"
    )
    print(f"ratio qlora-lite / peft: {m['qlora'] / max(m['peft'], 1):.2f}")


if __name__ == "__main__":
    main()
