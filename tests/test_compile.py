"""`train.compile`: the decoder layers compiled regionally give eager's loss and adapter gradients (4-bit base, LoRA,
bf16 autocast, non-reentrant checkpointing, packed rows), with one graph for every layer and no graph breaks; the
combinations it cannot compile are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_lite import apply_lora
from qlora_lite.errors import ConfigError
from qlora_lite.model.lora import adapter_state_dict, lora_layers
from qlora_lite.training import compile as compile_module
from qlora_lite.training.checkpointing import enable_gradient_checkpointing
from qlora_lite.training.compile import compile_decoder_layers, decoder_layers, inductor_unavailable
from qlora_lite.training.step import forward_loss_sum
from qlora_lite.training.tiled_mlp import enable_tiled_mlp
from tests.test_memory import load

CPU = torch.device("cpu")
NO_INDUCTOR = inductor_unavailable(CPU)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")  # hidden 64, 2 layers


def _model(model_dir, bits=4, adapter_dtype=torch.bfloat16, checkpointing=True):
    model = load(model_dir, bits=bits)
    apply_lora(model, r=4, alpha=8, seed=0, adapter_dtype=adapter_dtype)
    with torch.no_grad():  # B = 0 would make every A gradient zero
        generator = torch.Generator().manual_seed(1)
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.02)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _batch(seq_len=40, packed=True, seed=0):
    ids = torch.randint(0, 300, (2, seq_len), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    if packed:  # two records per row, positions restarting at 0
        cut = seq_len // 3
        batch["position_ids"] = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)]).repeat(2, 1)
    return batch


def _step(model, batch, bf16=True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The trainer's forward and backward (`train_step` without the update): loss and fp32 adapter gradients."""
    model.zero_grad(set_to_none=True)
    loss = forward_loss_sum(model, batch, CPU, bf16=bf16)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved_activation_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for backward over one forward, each storage once, leaving out the model's
    own weights (4-bit quantization state included) and what every layer shares and the step holds anyway (mask,
    rotary tables: eager checkpointing keeps them alive through its closure, a compiled graph saves them)."""
    owned = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        owned.add(tensor.untyped_storage().data_ptr())
        state = getattr(tensor, "quant_state", None)
        for holder in (state, getattr(state, "state2", None)):
            for value in vars(holder).values() if holder is not None else ():
                if isinstance(value, torch.Tensor):
                    owned.add(value.untyped_storage().data_ptr())

    def shared_inputs(module, args, kwargs):
        for value in kwargs.values():
            for tensor in value if isinstance(value, tuple) else (value,):
                if isinstance(tensor, torch.Tensor):
                    owned.add(tensor.untyped_storage().data_ptr())

    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = [layer.register_forward_pre_hook(shared_inputs, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = forward_loss_sum(model, batch, CPU)
    finally:
        for hook in hooks:
            hook.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _fresh_dynamo():
    """Dynamo with no compiled code and its counters (graphs, graph breaks) at zero; returns the counters."""
    from torch._dynamo.utils import counters  # imported here: collecting the suite needs no dynamo

    torch._dynamo.reset()
    counters.clear()
    return counters


@pytest.mark.slow
@pytest.mark.skipif(NO_INDUCTOR is not None, reason=f"inductor cannot compile here: {NO_INDUCTOR}")
def test_compiled_layers_give_eager_loss_and_gradients(model_dir):
    batch = _batch()
    _, reference = _step(_model(model_dir, adapter_dtype=torch.float32), batch, bf16=False)
    eager = _model(model_dir)
    eager_loss, eager_grads = _step(eager, batch)
    counters = _fresh_dynamo()
    model = _model(model_dir)
    assert compile_decoder_layers(model) == 2
    loss, grads = _step(model, batch)
    assert abs(loss.item() - eager_loss.item()) <= 1e-4 * abs(eager_loss.item())
    for name in eager_grads:  # a bf16 rounding at most: no further from the fp32 gradient than eager's
        eager_err, compiled_err = _rel(eager_grads[name], reference[name]), _rel(grads[name], reference[name])
        assert compiled_err <= 1.5 * eager_err + 1e-3, (name, compiled_err, eager_err)
    assert not counters["graph_break"]  # 4-bit linears, LoRA, autocast and the checkpoint all inside the graph
    assert counters["stats"]["unique_graphs"] == 1  # traced for layer 0, reused by layer 1: no recompile
    again, _ = _step(model, batch)
    assert again.equal(loss) and counters["stats"]["unique_graphs"] == 1
    # still checkpointed: each layer keeps its input (and the shared rotary tables), not its intermediates
    eager_bytes, compiled_bytes = _saved_activation_bytes(eager, batch), _saved_activation_bytes(model, batch)
    assert compiled_bytes == eager_bytes, (compiled_bytes, eager_bytes)
    assert adapter_state_dict(model).keys() == adapter_state_dict(eager).keys()  # the module tree is unchanged


@pytest.mark.parametrize("bits", [4, pytest.param(8, marks=pytest.mark.slow)])  # 8-bit: ~13 s on 2 cores
def test_compiled_graph_is_eager_value_for_value(model_dir, bits):
    """The graph dynamo captures (run through AOT autograd without inductor: quick) is eager's exactly, without
    checkpointing too, where the first layer's input needs no gradient and so gets a graph of its own."""
    batch = _batch(packed=False)
    eager = _model(model_dir, bits=bits, checkpointing=False)
    eager_loss, eager_grads = _step(eager, batch)
    counters = _fresh_dynamo()
    model = _model(model_dir, bits=bits, checkpointing=False)
    compile_decoder_layers(model, backend="aot_eager")
    loss, grads = _step(model, batch)
    assert loss.equal(eager_loss)
    assert all(grads[name].equal(eager_grads[name]) for name in eager_grads)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2  # layer 0 (input without gradient) and layer 1
    eager.eval(), model.eval()
    with torch.no_grad():
        assert forward_loss_sum(model, batch, CPU).equal(forward_loss_sum(eager, batch, CPU))


def test_compiled_layers_with_selective_recompute_are_eager_value_for_value(tiny_model_dir):
    """train.checkpoint_every with train.compile: the checkpointed layers and the others each get one graph, and
    loss and gradients are eager's exactly (the captured graphs through AOT autograd, without inductor)."""
    model_dir = tiny_model_dir("llama", layers=4)
    batch = _batch()
    eager = _model(model_dir, checkpointing=False)
    enable_gradient_checkpointing(eager, every=2)  # layers 0 and 2 recomputed, 1 and 3 keep their activations
    eager_loss, eager_grads = _step(eager, batch)
    counters = _fresh_dynamo()
    model = _model(model_dir, checkpointing=False)
    enable_gradient_checkpointing(model, every=2)
    assert compile_decoder_layers(model, backend="aot_eager") == 4
    loss, grads = _step(model, batch)
    assert loss.equal(eager_loss)
    assert all(grads[name].equal(eager_grads[name]) for name in eager_grads)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2  # a checkpointed layer's graph and a kept layer's
    # AOT autograd's partitioner may recompute cheap ops rather than save them, so a compiled kept layer saves no
    # more than eager does: the memory model, which follows eager, stays an upper bound
    assert _saved_activation_bytes(model, batch) <= _saved_activation_bytes(eager, batch)


@pytest.mark.parametrize(
    "enable, message",
    [
        (lambda model: enable_tiled_mlp(model), "train.tiled_mlp"),
        (lambda model: enable_gradient_checkpointing(model, offload=True), "train.offload_activations"),
    ],
)
def test_combinations_that_do_not_compile_are_refused(model_dir, enable, message):
    model = _model(model_dir, checkpointing=False)
    enable(model)
    with pytest.raises(ConfigError, match=message):
        compile_decoder_layers(model, backend="aot_eager")
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


def test_refused_without_decoder_layers_or_a_compiler(model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="no decoder layers"):
        compile_decoder_layers(nn.Sequential(nn.Linear(4, 4)))
    monkeypatch.setattr(compile_module, "inductor_unavailable", lambda device: "no C++ compiler here")
    model = _model(model_dir)
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler here; or set train.compile: false"):
        compile_decoder_layers(model)
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


def test_the_run_compiles_its_layers_when_train_compile_is_set(model_dir, tmp_path, monkeypatch):
    import json

    from qlora_lite.config.load import config_from_dict
    from qlora_lite.training import setup

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    settings = {
        "model": str(model_dir), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "train.jsonl"), "max_seq_len": 16},
        "train": {"max_steps": 1, "compile": True},
    }  # fmt: skip
    compiled = []
    monkeypatch.setattr(
        setup, "compile_decoder_layers", lambda model: compiled.append(compile_decoder_layers(model, backend="eager"))
    )
    parts = setup.prepare_run(config_from_dict(settings), CPU)
    assert compiled == [2]
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(parts.model))
    for clash in ({"tiled_mlp": True}, {"offload_activations": True}, {"fsdp": True}):
        config = config_from_dict({**settings, "train": {**settings["train"], **clash}})
        with pytest.raises(ConfigError, match=f"train.compile cannot be combined with train.{next(iter(clash))} yet"):
            config.validate()
