"""FSDP2 sharding of a 4-bit QLoRA model (`training/fsdp.py`) on 2 CPU ranks (gloo) against one process: initial
adapters, logits and adapter gradients bitwise equal, the gathered adapter saved byte-identical, per-rank peak RSS
of a sharded load below an unsharded load, HSDP, activation checkpointing, and 8-bit bases refused.

One torchrun launch (tests/distributed/fsdp_worker.py) does every check on the ranks; an unsharded load of the
same big model runs meanwhile in a subprocess, and the one-process reference runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.fsdp_worker import BIG_LORA, LORA, SEED, input_ids, lora_values, micro_batches
from tests.helpers import snapshot, torchrun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets and reads VmHWM through /proc"),
]

WORKER = Path(__file__).resolve().parent / "distributed" / "fsdp_worker.py"
MIB = 2**20

# An unsharded load measured as the worker measures its sharded one: the same warm-up, then peak RSS above the start.
UNSHARDED_LOAD = r"""
import gc, json, sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
import torch
torch.set_num_threads(1)
from qlora_lite.io.heap import malloc_trim
from qlora_lite.model.loader import load_quantized
from qlora_lite.model.lora import apply_lora
from qlora_lite.model.quant import is_quantized_linear, quant_state_tensors

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

big, tiny, r, alpha, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
warm, _ = load_quantized(tiny, device="cpu", load_tokenizer=False)
apply_lora(warm, r, alpha, seed=seed)
del warm
gc.collect(); malloc_trim()()
Path("/proc/self/clear_refs").write_text("5")
start = status("VmRSS")
model, _ = load_quantized(big, device="cpu", load_tokenizer=False)
apply_lora(model, r, alpha, seed=seed)
peak = status("VmHWM")
held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
held += sum(sum(s.numel() * s.element_size() for s in quant_state_tensors(m.weight.quant_state))
            for m in model.modules() if is_quantized_linear(m))
print(json.dumps({"start": start, "peak": peak, "local_bytes": held}))
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_model_dir):
    """The worker's results per rank, the unsharded load's memory, and the paths involved."""
    from qlora_lite.model.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("fsdp")
    tiny = tiny_model_dir("llama")  # hidden 64, 2 layers
    big = save_tiny_model(
        root / "big",
        "llama",
        dtype=torch.bfloat16,
        hidden_size=512,
        intermediate_size=1024,
        layers=32,
        with_tokenizer=False,
    )  # 32 layers of 2.4M weights: ~36 MiB packed in 4 bits; the largest tensor 1 MiB in bf16
    out = root / "out"
    out.mkdir()
    # Large temporaries (bitsandbytes' CPU quantization needs ~22 bytes per weight) go back to the OS when freed in
    # both processes, rather than staying in glibc's heap in patterns that differ between the two loads.
    env = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    command = [sys.executable, "-c", UNSHARDED_LOAD, str(big), str(tiny), *(str(v) for v in BIG_LORA.values())]
    unsharded = subprocess.Popen(
        [*command, str(SEED)], env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        proc = torchrun([str(WORKER), str(tiny), str(big), str(out)], timeout=240, env=env)
        ref_out, ref_err = unsharded.communicate(timeout=120)
    finally:
        unsharded.kill()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert unsharded.returncode == 0, ref_err[-4000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    tensors = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    return {
        "json": results,
        "tensors": tensors,
        "unsharded": json.loads(ref_out.strip().splitlines()[-1]),
        "tiny": tiny,
        "out": out,
    }


@pytest.fixture(scope="module")
def one_process(ranks, tmp_path_factory):
    """The same model in one process: initial adapter, logits, the two micro-batches' gradients accumulated in fp32
    by the trainer's optimizer, and the adapter saved by `save_adapter`."""
    from qlora_lite.data.batching import target_count
    from qlora_lite.export.adapter import save_adapter
    from qlora_lite.model.loader import load_quantized
    from qlora_lite.model.lora import adapter_state_dict, apply_lora
    from qlora_lite.training.optim import AdapterOptimizer
    from qlora_lite.training.step import forward_loss_sum

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        model, _ = load_quantized(ranks["tiny"], device="cpu", load_tokenizer=False)
        apply_lora(model, LORA["r"], LORA["alpha"], seed=SEED)
        state = adapter_state_dict(model)
        init = {k: v.detach().clone() for k, v in state.items()}
        with torch.no_grad():
            for key, value in lora_values({k: tuple(v.shape) for k, v in state.items()}).items():
                state[key].copy_(value)
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=input_ids()).logits.float()
        model.train()
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer = AdapterOptimizer([p for p in model.parameters() if p.requires_grad], "adamw")
        batches = micro_batches()
        total = sum(target_count(b["labels"]) for b in batches)
        for batch in batches:
            forward_loss_sum(model, batch, torch.device("cpu"), normalizer=float(total)).backward()
            optimizer.accumulate_grads()
        grads = {names[id(p)]: m.grad for p, m in zip(optimizer.params, optimizer.masters)}
        adapter = save_adapter(model, tmp_path_factory.mktemp("one") / "adapter")
    finally:
        torch.set_num_threads(threads)
    return {"init": init, "logits": logits, "grads": grads, "adapter": adapter}


def test_sharded_load_draws_the_same_adapters_and_gives_the_same_logits(ranks, one_process):
    assert ranks["json"][0]["mesh"] == [["shard"], [2]]
    for tensors in ranks["tensors"]:
        for key, value in one_process["init"].items():
            assert torch.equal(tensors[f"init.{key}"], value), key
        assert torch.equal(tensors["logits"], one_process["logits"])


def test_two_ranks_sum_gradients_like_one_process_accumulating(ranks, one_process):
    assert ranks["json"][0]["chunked_loss"]  # the loss ran model.base_model, then lm_head's weight chunk by chunk
    grads = one_process["grads"]
    assert any(g.abs().sum() > 0 for k, g in grads.items() if ".lora_A." in k)
    for tensors in ranks["tensors"]:
        for prefix in ("grad", "grad_gc", "hsdp_grad"):
            got = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            assert got.keys() == grads.keys(), prefix
            for key, value in grads.items():
                assert got[key].dtype == torch.float32
                assert torch.equal(got[key], value), f"{prefix}: {key}"
    assert ranks["json"][0]["gc_q_proj_forwards"] == 2  # activation checkpointing recomputed layer 0 in backward


def test_hsdp_replicates_across_nodes(ranks, one_process):
    assert ranks["json"][0]["hsdp_mesh"] == [["replicate", "shard"], [2, 1]]
    for tensors in ranks["tensors"]:
        assert torch.equal(tensors["hsdp_logits"], one_process["logits"])


def test_gathered_adapter_saves_byte_identical(ranks, one_process):
    assert ranks["json"][0]["saved_dtypes"] == ["torch.bfloat16"]
    assert snapshot(ranks["out"] / "adapter") == snapshot(one_process["adapter"])


def test_sharded_load_peak_rss_per_rank_is_below_an_unsharded_load(ranks):
    unsharded = ranks["unsharded"]
    whole = unsharded["peak"] - unsharded["start"]
    for result in ranks["json"]:
        load = result["load"]
        assert load["local_bytes"] < 0.6 * unsharded["local_bytes"]
        above = load["peak"] - load["start"]
        print(
            f"peak RSS above start: sharded rank {above / MIB:.1f} MiB (holds {load['local_bytes'] / MIB:.1f}), "
            f"unsharded {whole / MIB:.1f} MiB (holds {unsharded['local_bytes'] / MIB:.1f})"
        )
        assert above < 0.9 * whole, f"sharded load {above / MIB:.1f} MiB vs unsharded {whole / MIB:.1f} MiB"
    local, full, dtype = ranks["json"][0]["packed_shard"]
    assert local[0] == -(-full[0] // 2) and local[1] == full[1] == 1 and dtype == "torch.uint8"


def test_eight_bit_bases_are_refused(ranks):
    for result in ranks["json"]:
        for key in ("eight_bit_shard", "eight_bit_load"):
            assert result[key] is not None and result[key].startswith("FSDP shards 4-bit bases only"), result[key]
