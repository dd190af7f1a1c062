"""The tiled MLP (`train.tiled_mlp`): the same loss and gradients as the untiled layer, and the memory model follows
what autograd keeps and the peak it reaches on the CPU."""

from __future__ import annotations

import pytest
import torch

from qlora_lite import apply_lora, estimate_memory
from qlora_lite.memory.probe import AllocationTracker, unique_bytes
from qlora_lite.model.lora import lora_layers
from qlora_lite.training.checkpointing import enable_gradient_checkpointing
from qlora_lite.training.loss import causal_lm_loss
from qlora_lite.training.optim import AdapterOptimizer
from qlora_lite.training.step import forward_loss_sum
from qlora_lite.training.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp
from tests.test_memory import batch, load


def _grads(model, ids, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    data = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    loss = forward_loss_sum(model, data, torch.device("cpu"), bf16=bf16)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(model_dir, checkpointing):
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = None
    for bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        model = load(model_dir)
        apply_lora(model, r=4, alpha=8, seed=0, adapter_dtype=dtype)
        with torch.no_grad():  # B = 0 would make every A gradient zero
            for layer in lora_layers(model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=torch.Generator()) * 0.02)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        loss, grads = _grads(model, ids, bf16)
        assert enable_tiled_mlp(model, tile=8) == 2  # 40 positions: 5 tiles in each of the 2 layers
        tiled_loss, tiled = _grads(model, ids, bf16)
        disable_tiled_mlp(model)
        again_loss, _ = _grads(model, ids, bf16)
        assert tiled_loss.equal(loss) and again_loss.equal(loss)  # the forward is the same, value for value
        mlp = [k for k in grads if ".mlp." in k]
        assert mlp and any(grads[k].norm() > 0 for k in mlp)
        if not bf16:
            reference = grads
            # fp32: only the order of the tiles' additions differs
            assert max(_rel(tiled[k], grads[k]) for k in grads) < 1e-6
        else:
            # bf16: each gradient is a bf16 rounding of the fp32 one; tiling rounds no worse than the whole layer
            untiled_err = max(_rel(grads[k], reference[k]) for k in grads)
            tiled_err = max(_rel(tiled[k], reference[k]) for k in grads)
            assert tiled_err < 1.5 * untiled_err + 1e-3, (tiled_err, untiled_err)


def _stored_after_forward(model_dir, checkpointing: bool, seq_len: int, tile: int) -> int:
    model = load(model_dir)
    apply_lora(model, r=4, seed=0)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_tiled_mlp(model, tile=tile)
    ids = batch(model, 2, seq_len)
    with AllocationTracker() as tracker:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        stored = tracker.current
        loss.backward()
    return stored


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stored_activations_with_the_tiled_mlp_equal_what_autograd_keeps(model_dir, checkpointing):
    measured = _stored_after_forward(model_dir, checkpointing, seq_len=32, tile=8)
    report = estimate_memory(
        model_dir, bits=4, rank=4, seq_len=32, batch_size=2, gradient_checkpointing=checkpointing, device="cpu",
        chunked_loss=False, padding=False, tiled_mlp=True, tile_tokens=8,
    )  # fmt: skip
    assert report.details["stored_after_forward"] == measured
    untiled = estimate_memory(
        model_dir, bits=4, rank=4, seq_len=32, batch_size=2, gradient_checkpointing=checkpointing, device="cpu",
        chunked_loss=False, padding=False,
    )  # fmt: skip
    if not checkpointing:  # the MLP's intermediates are no longer kept
        assert untiled.details["stored_after_forward"] > measured


@pytest.mark.parametrize("batch_size,seq_len,tile", [(2, 64, 16), (1, 256, 64)])
def test_predicted_peak_with_the_tiled_mlp_matches_the_cpu_allocation_peak(tiny_model_dir, batch_size, seq_len, tile):
    model_dir = tiny_model_dir("llama", hidden_size=128, vocab_size=512)
    model = load(model_dir)
    apply_lora(model, r=4, seed=0)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_tiled_mlp(model, tile=tile)
    opt = AdapterOptimizer([p for p in model.parameters() if p.requires_grad], "adamw_8bit")
    before = unique_bytes(list(model.parameters()) + list(model.buffers()) + opt.masters)
    ids = batch(model, batch_size, seq_len)
    with AllocationTracker() as tracker:
        for step in (True, False, True):
            causal_lm_loss(model, ids, ids, chunk_size=8).backward()
            opt.accumulate_grads()
            if step:
                opt.step()
                opt.zero_grad()
    measured = before + tracker.peak
    settings = dict(
        bits=4, rank=4, seq_len=seq_len, batch_size=batch_size, gradient_checkpointing=True, optimizer="adamw_8bit",
        grad_accum=2, device="cpu", chunked_loss=True, loss_chunk_tokens=8, padding=False,
    )  # fmt: skip
    report = estimate_memory(model_dir, tiled_mlp=True, tile_tokens=tile, **settings)
    assert abs(report.allocated_peak / measured - 1) < 0.05, (report.allocated_peak, measured, report.peak_phase)
    assert estimate_memory(model_dir, **settings).allocated_peak > 1.2 * measured  # what tiling saved here


def test_llama_8b_at_its_full_context_fits_24gb_with_the_tiled_mlp():
    settings = dict(seq_len=131072, batch_size=1, offload_activations=True)
    assert estimate_memory("llama-3.1-8b", **settings).total > 24e9
    tiled = estimate_memory("llama-3.1-8b", tiled_mlp=True, **settings)
    assert tiled.total < 24e9, tiled.total
