"""The memory per rank of a torchrun launch (`memory.ranks`, `qlora-lite memory --gpus N [--fsdp] [--nodes M]`):
FSDP's shards counted by hand, replicated statistics, data parallel's gradient buffer, the GPUs a model needs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from qlora_lite.cli import main
from qlora_lite.errors import ConfigError
from qlora_lite.memory.advice import parse_budget
from qlora_lite.memory.constants import GiB
from qlora_lite.memory.gpu_plan import fit_on, gpus_needed
from qlora_lite.memory.inventory import build_inventory
from qlora_lite.memory.persistent import optimizer_state_bytes
from qlora_lite.memory.ranks import rank_report
from qlora_lite.memory.report import report_for
from qlora_lite.memory.settings import make_settings
from qlora_lite.model.quant import weight_bytes_4bit

from .helpers import one_error_line

QWEN = "qwen2.5-0.5b"  # hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads of 64, vocab 151936, tied
SMALL = dict(seq_len=512, batch_size=1)


def qwen_shapes() -> list[tuple[int, int]]:
    h, i, kv = 896, 4864, 2 * 64
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q, k, v, o, gate, up, down [out, in]


def fsdp(name: str, gpus: int, **settings):
    inv = build_inventory(name)
    return rank_report(inv, make_settings(**{**SMALL, **settings}, fsdp=True, gpus=gpus))


# ------------------------------------------------------------------------------------------- FSDP


@pytest.mark.parametrize("gpus", [1, 3, 4])
def test_fsdp_shards_every_tensor_by_hand(gpus):
    """Packed codes [ceil(n/2), 1] and the bf16 parameters, dim 0 padded to a multiple of N, counted by hand."""
    rank = fsdp(QWEN, gpus)
    layers, h = 24, 896
    packed = layers * sum(math.ceil(math.ceil(o * n / 2) / gpus) for o, n in qwen_shapes())
    assert rank.components["quantized_weights"] == packed
    rows = lambda n: math.ceil(n / gpus)  # noqa: E731
    per_layer = 2 * rows(h) + rows(h) + 2 * rows(128)  # two norms, q/k/v biases
    plain = 2 * (layers * per_layer + rows(h) + rows(151936) * h)  # + final norm, the tied embedding once
    assert rank.components["unquantized_weights"] == plain
    adapters = layers * sum(rows(16) * n + rows(o) * 16 for o, n in qwen_shapes())  # A [16, in], B [out, 16]
    assert rank.components["lora_adapters"] == 4 * adapters  # fp32 under FSDP
    assert rank.details["trainable_parameters_per_rank"] == adapters
    # the fp32 shards are their own optimizer masters, and their one fp32 .grad also accumulates the micro-batches
    shards = [n for o, i in qwen_shapes() for n in (rows(16) * i, rows(o) * 16)] * layers
    own = optimizer_state_bytes(shards, "paged_adamw_8bit", per_tensor=True)[0] - 4 * adapters  # one state per shard
    assert rank.components["optimizer_state"] == own
    assert rank.size("lora_gradients") == 4 * adapters and rank.size("gradient_accumulation") == 0
    if gpus == 3:  # 896 * 896 / 2 codes do not divide by 3: the shard is padded
        assert packed > layers * sum(o * n for o, n in qwen_shapes()) // 2 // 3


def test_quantization_statistics_stay_replicated():
    one, four = fsdp(QWEN, 1), fsdp(QWEN, 4)
    stats = 24 * sum(weight_bytes_4bit(o, n) - math.ceil(o * n / 2) for o, n in qwen_shapes())
    assert one.components["quantization_statistics"] == four.components["quantization_statistics"] == stats
    single = report_for(build_inventory(QWEN), make_settings(**SMALL))
    assert one.components["quantized_weights"] + stats == single.components["quantized_weights"]


def test_fsdp_buffers_are_two_layers_the_root_and_the_reduce_scatter():
    rank = fsdp(QWEN, 2)
    layer = sum(math.ceil(o * n / 2) for o, n in qwen_shapes())  # packed codes
    layer += 2 * (2 * 896 + 896 + 2 * 128)  # bf16 norms and biases
    lora = sum(16 * (o + n) for o, n in qwen_shapes())
    layer += 2 * lora  # LoRA cast to bf16 for compute
    assert rank.components["fsdp_all_gather"] == 2 * layer
    assert rank.size("fsdp_reduce_scatter") == 2 * 4 * lora
    assert rank.components["fsdp_root_gathered"] == 2 * (151936 * 896 + 896)  # tied embedding + final norm


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-3.1-8b", "llama-3.1-70b"])
def test_fsdp_per_rank_total_falls_with_every_gpu(name):
    totals = [fsdp(name, n).total for n in range(1, 9)]
    assert all(a > b for a, b in zip(totals, totals[1:])), totals


def test_nodes_replicate_the_shards():
    """HSDP: 8 GPUs on 2 nodes shard over 4, exactly like 4 GPUs on one node."""
    inv = build_inventory("llama-3.1-8b")
    hsdp = rank_report(inv, make_settings(**SMALL, fsdp=True, gpus=8, nodes=2))
    assert hsdp.shard == 4 and hsdp.mode == "hsdp"
    assert hsdp.total == rank_report(inv, make_settings(**SMALL, fsdp=True, gpus=4)).total


def test_activations_are_per_rank_and_unchanged():
    inv = build_inventory("llama-3.1-8b")
    s = make_settings(seq_len=2048, batch_size=2)
    single = report_for(inv, s)
    rank = rank_report(inv, replace(s, fsdp=True, gpus=4))
    for key in ("activations", "layer_working_set", "dequant_temporaries", "logits_and_loss", "cuda_context"):
        assert rank.size(key) == single.size(key), key


# ------------------------------------------------------------------------------------ data parallel


@pytest.mark.parametrize("name,gpus,nodes", [("qwen2.5-0.5b", 2, 1), ("llama-3.1-8b", 8, 2), ("llama-3.2-1b", 3, 1)])
def test_data_parallel_all_reduces_in_the_flat_gradient_buffer(name, gpus, nodes):
    inv = build_inventory(name)
    s = make_settings(seq_len=1024, gpus=gpus, nodes=nodes)
    single = report_for(inv, s)
    rank = rank_report(inv, s)
    # the optimizer sums its flat fp32 gradient buffer in place: a rank holds what one GPU does, and no more
    assert rank.total == single.total and rank.components == single.components
    assert "all-reduced in place" in " ".join(rank.notes)
    assert rank_report(inv, replace(s, gpus=1, nodes=1)).total == single.total


# --------------------------------------------------------------------------------------- 70B on 24 GB


def test_llama_3_1_70b_needs_three_24gb_gpus_with_fsdp():
    """Answer.AI's 2 x 24 GB FSDP-QLoRA run was Llama-2-70B (vocabulary 32,000, below) with its parameters offloaded
    to CPU RAM. Llama 3.1's vocabulary of 128,256 makes the embeddings and lm_head 3.9 GiB in bf16, and the root
    module's gathered copy of both stays on every rank from forward to backward, so 2 x 24 GB does not fit at any
    activation setting; 3 do."""
    inv = build_inventory("llama-3.1-70b")
    h, i, kv, layers, vocab = 8192, 28672, 1024, 80, 128256
    linear = 2 * h * h + 2 * kv * h + 3 * i * h  # q, o, k, v, gate, up, down
    assert inv.total_params == layers * (linear + 2 * h) + 2 * vocab * h + h == 70_553_706_496  # published: 70.6B
    budget, label = parse_budget("24GB")
    leanest = make_settings(seq_len=512, batch_size=1, offload_activations=True, fsdp=True)
    one, two = rank_report(inv, replace(leanest, gpus=1)), rank_report(inv, replace(leanest, gpus=2))
    assert not one.fits(budget) and not two.fits(budget)
    fixed = sum(two.components[k] for k in ("quantized_weights", "quantization_statistics", "fsdp_root_gathered"))
    assert fixed + two.components["unquantized_weights"] > budget  # the weights alone, before any activation
    assert fit_on(inv, replace(leanest, gpus=2, seq_len=1024), budget) is None
    plan = gpus_needed(inv, make_settings(), budget, label)
    assert plan is not None and plan.gpus == 3
    s = plan.settings
    assert (s.seq_len, s.batch_size, s.grad_accum, s.gradient_checkpointing, s.chunked_loss) == (
        1024,
        1,
        16,
        True,
        True,
    )
    assert plan.per_rank.fits(budget) and plan.per_rank.total == rank_report(inv, s).total
    assert plan.sentence().startswith("needs 3 × 24GB GPUs with FSDP at seq 1024, batch 1")


LLAMA_2_70B = {  # meta-llama/Llama-2-70b-hf config.json
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def test_llama_2_70b_fits_on_two_24gb_gpus_at_seq_512():
    """Answer.AI's FSDP-QLoRA model (Llama-2-70B on 2 x 24 GB; they ran seq 2048, batch 2 with the sharded
    parameters in CPU RAM, which qlora-lite does not do): without that it fits at seq 512, micro-batch 1,
    checkpoints offloaded; not on one GPU."""
    inv = build_inventory(LLAMA_2_70B)
    assert inv.total_params == 68_976_648_192  # published for Llama-2-70b-hf
    budget, label = parse_budget("24GB")
    stated = make_settings(seq_len=512, batch_size=1, offload_activations=True, fsdp=True, gpus=2)
    assert rank_report(inv, stated).fits(budget)
    assert not rank_report(inv, replace(stated, gpus=1)).fits(budget)
    plan = gpus_needed(inv, make_settings(), budget, label)
    assert plan.gpus == 2 and plan.per_rank.fits(budget)
    s = plan.settings
    assert (s.seq_len, s.batch_size, s.grad_accum, s.offload_activations) == (1024, 1, 16, True)


# ---------------------------------------------------------------------------------------- gpus_needed


@pytest.mark.parametrize(
    "name,budget", [("llama-3.1-8b", 6 * GiB), ("qwen2.5-14b", 8 * GiB), ("llama-3.1-70b", 40 * GiB)]
)
def test_gpus_needed_is_the_smallest_count(name, budget):
    inv = build_inventory(name)
    s = make_settings(seq_len=2048)
    plan = gpus_needed(inv, s, budget)
    assert plan is not None and plan.per_rank.fits(budget)
    assert rank_report(inv, plan.settings).total == plan.per_rank.total
    if plan.gpus > 1:  # one GPU fewer fits neither with the plan's settings nor with any the search tries
        assert not rank_report(inv, replace(plan.settings, gpus=plan.gpus - 1)).fits(budget)
        assert fit_on(inv, replace(s, fsdp=True, gpus=plan.gpus - 1), budget) is None


def test_gpus_needed_keeps_the_settings_when_they_fit():
    inv = build_inventory("qwen2.5-0.5b")
    s = make_settings(seq_len=1024, batch_size=2)
    plan = gpus_needed(inv, s, 80 * GiB)
    assert plan.gpus == 1 and plan.changes == [] and (plan.settings.seq_len, plan.settings.batch_size) == (1024, 2)


def test_gpus_needed_gives_up_after_one_node():
    assert gpus_needed(build_inventory("llama-3.1-70b"), make_settings(), 4 * GiB) is None


def test_rank_settings_are_checked():
    with pytest.raises(ConfigError, match="gpus is 0"):
        make_settings(gpus=0)
    with pytest.raises(ConfigError, match="nodes is 3, which does not divide gpus 4"):
        make_settings(gpus=4, nodes=3)
    with pytest.raises(ConfigError, match="fsdp shards 4-bit bases only"):
        make_settings(fsdp=True, bits=8)
    with pytest.raises(ConfigError, match="fsdp trains LoRA adapters only"):
        make_settings(fsdp=True, modules_to_save=("lm_head",))


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpus", "0"], "gpus is 0; it must be a whole number, 1 or more"),
        (["--gpus", "4", "--nodes", "3"], "nodes is 3, which does not divide gpus 4"),
        (["--nodes", "0"], "nodes is 0"),
        (["--gpus", "2", "--fsdp", "--bits", "8"], "train.fsdp shards 4-bit bases only"),
    ],
)
def test_memory_command_bad_rank_input_exits_2_with_one_line(capsys, args, message):
    assert main(["memory", "llama-3.2-1b", *args]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def memory_json(capsys, *argv: str) -> dict:
    assert main(["memory", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_memory_command_json_has_the_per_rank_object(capsys):
    plain = memory_json(capsys, "llama-3.1-70b", "--gpu-memory", "24GB")
    out = memory_json(capsys, "llama-3.1-70b", "--gpus", "2", "--fsdp", "--gpu-memory", "24GB")
    assert set(out) == set(plain) | {"per_rank"} and "per_rank" in plain
    for key in ("total", "components", "advice", "phases"):
        assert out[key] == plain[key], key  # the single-GPU keys keep their meaning
    per_rank = out["per_rank"]
    inv = build_inventory("llama-3.1-70b")
    expected = rank_report(inv, make_settings(fsdp=True, gpus=2))
    assert per_rank["total"] == expected.total and per_rank["components"] == expected.components
    assert (per_rank["gpus"], per_rank["nodes"], per_rank["fsdp"], per_rank["shard"], per_rank["mode"]) == (
        2, 1, True, 2, "fsdp",
    )  # fmt: skip
    assert per_rank["fits"] is False and per_rank["headroom"] == 24 * 10**9 - expected.total
    assert per_rank["gpus_needed"]["gpus"] == 3 and per_rank["gpus_needed"]["settings"]["batch_size"] == 1
    assert plain["per_rank"]["total"] == plain["total"] and plain["per_rank"]["gpus_needed"] is None


def test_memory_command_says_how_many_gpus(capsys):
    assert main(["memory", "llama-3.1-70b", "--gpus", "2", "--fsdp", "--gpu-memory", "24GB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "per rank, 2 GPUs (FSDP, sharded over 2)" in out and "4-bit statistics (replicated)" in out
    assert "verdict per rank: does not fit" in out
    assert "needs 3 × 24GB GPUs with FSDP at seq 1024, batch 1, grad_accum 16" in out


def test_fsdp_follows_the_config_file(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model: qwen2.5-0.5b\ntrain:\n  fsdp: true\n")
    assert memory_json(capsys, str(run), "--gpus", "2")["per_rank"]["fsdp"] is True
    assert memory_json(capsys, str(run), "--gpus", "2", "--no-fsdp")["per_rank"]["fsdp"] is False
    assert memory_json(capsys, "qwen2.5-0.5b", "--gpus", "2")["per_rank"]["fsdp"] is False  # the schema's default
