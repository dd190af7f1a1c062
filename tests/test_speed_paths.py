"""The lean training paths give the same numbers as the plain ones: chunked loss vs full logits in a real
run, and checkpointed activations offloaded to CPU memory vs kept in place."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_lite import apply_lora, load_quantized, train
from qlora_lite.model.lora import lora_layers
from qlora_lite.training import checkpointing
from qlora_lite.training.checkpointing import enable_gradient_checkpointing
from qlora_lite.training.loss import causal_lm_loss
from tests.helpers import rel_err
from tests.test_train import _config, toy_data  # noqa: F401  (fixture)


def _adapter_grads(model, ids) -> dict[str, torch.Tensor]:
    loss = causal_lm_loss(model, ids, ids)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _lora_model(model_dir):
    """A 4-bit tiny model with LoRA whose B is not zero (so every adapter gets a gradient), in training mode, and a
    batch of token ids."""
    model, _ = load_quantized(model_dir, device="cpu")
    apply_lora(model, r=4, alpha=8, seed=0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model.train()
    return model, torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))


def test_offloaded_activations_give_the_same_gradients(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(checkpointing, "OFFLOAD_MIN_BYTES", 1024)  # the tiny layers' inputs are 6 KiB
    model, ids = _lora_model(tiny_model_dir("llama"))
    enable_gradient_checkpointing(model, offload=False)
    kept = _adapter_grads(model, ids)
    enable_gradient_checkpointing(model, offload=True)
    offloaded = _adapter_grads(model, ids)
    hooks = model.model.layers[0]._gradient_checkpointing_func.offloaded
    assert hooks.next_key == 2  # each layer's input went to CPU memory and came back
    assert len(hooks.handles) == 0  # and nothing is held once the graph is freed
    assert kept.keys() == offloaded.keys() and len(kept) == 28
    for name, grad in kept.items():
        assert grad.abs().sum() > 0, name
        assert rel_err(offloaded[name], grad) <= 1e-6, name


def test_chunked_loss_run_matches_full_logits_run(tiny_model_dir, toy_data, tmp_path):  # noqa: F811
    runs = {}
    for chunk in (0, 5):
        config = _config(
            tiny_model_dir("llama"),
            toy_data,
            tmp_path / f"chunk-{chunk}",
            loss_chunk_tokens=chunk,
            offload_activations=chunk > 0,
        )
        result = train(config)
        lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        runs[chunk] = ([r["loss"] for r in lines if "loss" in r], result.eval_loss)
    (full_losses, full_eval), (chunked_losses, chunked_eval) = runs[0], runs[5]
    assert len(full_losses) == len(chunked_losses) == 6
    assert abs(chunked_losses[0] - full_losses[0]) <= 1e-3 * full_losses[0]  # same first-step loss
    for a, b in zip(chunked_losses, full_losses):
        assert abs(a - b) <= 2e-2 * b  # the curves stay together (bf16 noise only)
    assert abs(chunked_eval - full_eval) <= 2e-2 * full_eval
    assert full_losses[-1] < full_losses[0]


def test_offload_needs_checkpointing():
    from qlora_lite.config.settings import TrainSettings
    from qlora_lite.errors import ConfigError

    with pytest.raises(ConfigError, match="offload_activations needs train.gradient_checkpointing"):
        TrainSettings(gradient_checkpointing=False, offload_activations=True).validate()


def _recomputed_layers(model, ids) -> list[int]:
    """Indices of the decoder layers whose forward ran twice in one forward + backward."""
    calls: list[int] = []
    handles = [
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        causal_lm_loss(model, ids, ids).backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return sorted(i for i in set(calls) if calls.count(i) == 2)


def test_selective_recompute_gives_the_same_gradients(tiny_model_dir):
    model, ids = _lora_model(tiny_model_dir("llama", layers=5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enable_gradient_checkpointing(model)
        assert _recomputed_layers(model, ids) == [0, 1, 2, 3, 4]
        every_layer = _adapter_grads(model, ids)
        enable_gradient_checkpointing(model, every=2)
        assert _recomputed_layers(model, ids) == [0, 2, 4]  # layers 1 and 3 keep their activations
        selective = _adapter_grads(model, ids)
        enable_gradient_checkpointing(model, every=3)
        assert _recomputed_layers(model, ids) == [0, 3]
    assert every_layer.keys() == selective.keys() and len(every_layer) == 5 * 7 * 2
    for name, grad in every_layer.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(selective[name], grad), name  # the recompute repeats the forward exactly on the CPU


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            dict(checkpoint_every=2, gradient_checkpointing=False),
            "checkpoint_every is 2 but train.gradient_checkpointing is off",
        ),
        (dict(checkpoint_every=2, tiled_mlp=True), "does not run with train.tiled_mlp yet"),
        (dict(checkpoint_every=4, offload_activations=True, fsdp=True), "train.offload_activations or train.fsdp"),
        (dict(checkpoint_every=0), "train.checkpoint_every is 0"),
    ],
)
def test_selective_recompute_refuses_what_it_does_not_support(settings, message):
    from qlora_lite.config.settings import TrainSettings
    from qlora_lite.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        TrainSettings(**settings).validate()
