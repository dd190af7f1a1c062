"""The ranks of tests/test_fsdp.py: `torchrun --nproc_per_node 2 fsdp_worker.py TINY BIG OUT` (gloo on the CPU).

Each rank, in one launch: loads TINY with `training.fsdp.load_sharded` (which also warms every code path), measures
the peak RSS of a sharded load of BIG, then on TINY: the initial adapter, logits, the adapter gradients of one
micro-batch per rank (with and without activation checkpointing), the gathered adapter saved by rank 0, the same
model under HSDP (a two-node mesh of one rank per node), and the 8-bit refusals. It writes OUT/rank<r>.json and
OUT/rank<r>.safetensors; the test compares them with one process. The inputs (`LORA`, `SEED`, `input_ids`,
`micro_batches`, `lora_values`) are shared with the test, which imports this file.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

LORA = {"r": 8, "alpha": 16.0}
BIG_LORA = {
    "r": 1,
    "alpha": 16.0,
}  # the memory check's adapters stay small beside its narrow layers, as in a real model
SEED = 7


def input_ids() -> torch.Tensor:
    """The prompt whose logits are compared."""
    return torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(11))


def micro_batches() -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of different widths, with right padding and unlabelled prompt tokens: rank r trains on the
    r-th, one process on both."""
    batches = []
    for index, (width, short) in enumerate(((20, 13), (28, 9))):
        ids = torch.randint(3, 259, (2, width), generator=torch.Generator().manual_seed(100 + index))
        mask = torch.ones_like(ids)
        mask[1, short:] = 0
        ids[1, short:] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        labels[mask == 0] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def lora_values(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Non-zero bf16 values for every adapter tensor (a fresh B is zero, which would hide the adapters)."""
    generator = torch.Generator().manual_seed(5)
    return {key: (torch.randn(shapes[key], generator=generator) * 0.05).bfloat16() for key in sorted(shapes)}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    gc.collect()
    from qlora_lite.io.heap import malloc_trim

    malloc_trim()()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _local_bytes(model: torch.nn.Module) -> int:
    """Bytes this rank holds of the model: its parameter shards, buffers and the (replicated) quantization states."""
    from torch.distributed.tensor import DTensor

    from qlora_lite.model.quant import is_quantized_linear, quant_state_tensors

    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    for module in model.modules():
        if is_quantized_linear(module) and module.quant_state is not None:
            total += sum(t.numel() * t.element_size() for t in quant_state_tensors(module.quant_state))
    return total


def _set_lora(model: torch.nn.Module) -> None:
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in lora_values({k: tuple(params[k].shape) for k in params if ".lora_" in k}).items():
            param = params[key]
            param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))


def _gathered_grads(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    grads = {f"{prefix}.{n}": p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _grads(model, batch, total, device, prefix):
    from qlora_lite.training.step import forward_loss_sum

    model.train()
    forward_loss_sum(model, batch, device, normalizer=float(total)).backward()
    return _gathered_grads(model, prefix)


def main(tiny: str, big: str, out: str) -> None:
    from safetensors.torch import save_file

    from qlora_lite.config.settings import LoraConfig, QuantConfig
    from qlora_lite.data.batching import target_count
    from qlora_lite.errors import ConfigError
    from qlora_lite.export.adapter import save_adapter
    from qlora_lite.model.loader import load_quantized
    from qlora_lite.model.lora import apply_lora
    from qlora_lite.training.checkpointing import enable_gradient_checkpointing
    from qlora_lite.training.distributed import World, start, stop, world_from_env
    from qlora_lite.training.fsdp import full_adapter_state, load_sharded, shard_model
    from qlora_lite.training.loss import supports_chunked_loss

    torch.set_num_threads(1)
    world, device, out_dir = world_from_env(), torch.device("cpu"), Path(out)
    start(world, device, 120)
    quant, lora = QuantConfig(), LoraConfig(**LORA)
    result: dict = {}
    tensors: dict[str, torch.Tensor] = {}

    model, mesh = load_sharded(tiny, world, device, quant, lora, seed=SEED)  # also the warm-up of the big load
    result["mesh"] = list(mesh.mesh_dim_names), list(mesh.shape)

    _reset_peak()
    start_rss = _status_bytes("VmRSS")
    sharded, _ = load_sharded(big, world, device, quant, LoraConfig(**BIG_LORA), seed=SEED)
    result["load"] = {"start": start_rss, "peak": _status_bytes("VmHWM"), "local_bytes": _local_bytes(sharded)}
    weight = sharded.model.layers[0].mlp.down_proj.base_layer.weight
    result["packed_shard"] = [list(weight.to_local().shape), list(weight.shape), str(weight.dtype)]
    del sharded, weight
    gc.collect()

    tensors.update({f"init.{k}": v for k, v in full_adapter_state(model).items()})
    _set_lora(model)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tensors["logits"] = model(input_ids=input_ids()).logits.float()

    result["chunked_loss"] = supports_chunked_loss(model)  # the gradients below go through the base model alone
    batches = micro_batches()
    total = sum(target_count(b["labels"]) for b in batches)
    mine = batches[world.rank]
    tensors.update(_grads(model, mine, total, device, "grad"))
    enable_gradient_checkpointing(model)
    calls = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    tensors.update(_grads(model, mine, total, device, "grad_gc"))
    hook.remove()
    result["gc_q_proj_forwards"] = len(calls)  # 2: the forward and its recomputation in backward

    state = full_adapter_state(model)
    result["saved_dtypes"] = sorted({str(v.dtype) for v in state.values()})
    if world.is_main:
        save_adapter(model, out_dir / "adapter", state=state)

    two_nodes = World(rank=world.rank, size=world.size, local_rank=0, local_size=1)  # one rank per "node"
    hsdp, hsdp_mesh = load_sharded(tiny, two_nodes, device, quant, lora, seed=SEED)
    result["hsdp_mesh"] = list(hsdp_mesh.mesh_dim_names), list(hsdp_mesh.shape)
    _set_lora(hsdp)
    hsdp.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tensors["hsdp_logits"] = hsdp(input_ids=input_ids()).logits.float()
    tensors.update(_grads(hsdp, mine, total, device, "hsdp_grad"))

    eight, _ = load_quantized(tiny, bits=8, device="cpu", load_tokenizer=False)
    apply_lora(eight, LORA["r"], LORA["alpha"], seed=SEED)
    for what, call in (
        ("eight_bit_shard", lambda: shard_model(eight, world, device)),
        ("eight_bit_load", lambda: load_sharded(tiny, world, device, QuantConfig(bits=8), lora, seed=SEED)),
    ):
        try:
            call()
            result[what] = None
        except ConfigError as exc:
            result[what] = str(exc)

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"rank{world.rank}.safetensors"))
    (out_dir / f"rank{world.rank}.json").write_text(json.dumps(result))
    stop()


if __name__ == "__main__":
    main(*sys.argv[1:4])
