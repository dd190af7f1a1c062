"""New special tokens: added to the tokenizer, the embeddings grown to fit (mean rows), only the new rows trained
(peft's trainable_token_indices), the adapter loaded by peft onto the resized base, resume, and the merged export
(the vocabulary grown, the trained rows written, logits equal to the adapter's)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_lite import load_adapter, load_quantized
from qlora_lite.config.load import config_from_dict
from qlora_lite.training.loop import train
from tests.helpers import rel_err

NEW = ["<|im_start|>", "<|im_end|>"]
OLD_ROWS = 259  # make_tokenizer's length: the base's embedding is exactly the tokenizer
TOLERANCE = 1e-2  # as the LoRA parity tests: peft computes the adapter in fp32 where we use bf16
EMBED = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"


def _chat_data(path) -> None:
    rows = []
    for i in range(8):
        text = f"<|im_start|>user {i}<|im_end|>"
        rows.append({"prompt": f"q{i}: ", "completion": text * 2})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _settings(base, tmp_path, out: str, steps: int = 3) -> dict:
    _chat_data(tmp_path / "train.jsonl")
    return {
        "model": str(base),
        "output_dir": str(tmp_path / out),
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "train": str(tmp_path / "train.jsonl"),
            "max_seq_len": 48,
            "add_special_tokens": NEW,
            "resize_embeddings": True,
        },
        "train": {
            "max_steps": steps, "micro_batch_size": 2, "lr": 5e-2, "optimizer": "adamw", "seed": 3, "warmup_steps": 0,
            "schedule": "constant",
            "log_every": 1, "save_every": 2,
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """(base dir, run dir) of a 3-step run that added NEW and grew the embedding from 259 to 261 rows."""
    base = tiny_model_dir("llama", vocab_size=OLD_ROWS)
    tmp = tmp_path_factory.mktemp("new-tokens")
    train(config_from_dict(_settings(base, tmp, "run")), progress=False)
    return base, tmp / "run"


def _resized_reference(base) -> torch.nn.Module:
    """transformers' own fp32 model grown to 261 rows, new rows the mean of the old (what our loader does)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = module.weight.data
        mean = weight.mean(0, keepdim=True).to(torch.bfloat16).float()
        module.weight = torch.nn.Parameter(torch.cat([weight, mean.expand(len(NEW), -1)]))
    model.config.vocab_size = OLD_ROWS + len(NEW)
    return model.eval()


def test_adapter_files_are_peft_trainable_tokens(trained):
    base, run = trained
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": [259, 260], "lm_head": [259, 260]}
    assert config["qlora_lite"]["vocab_size"] == 261
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    assert tensors[EMBED].shape == (2, 64) and tensors[HEAD].shape == (2, 64)
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    assert len(tokenizer) == 261 and tokenizer.convert_tokens_to_ids(NEW) == [259, 260]
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [260]


def test_only_new_rows_train(trained):
    base, run = trained
    ours, _ = load_quantized(base, device="cpu")
    original = ours.get_input_embeddings().weight.detach().clone()
    load_adapter(ours, run / "adapter")
    embed = ours.get_input_embeddings()
    merged = embed.weight.detach()
    assert torch.equal(merged[:OLD_ROWS], original)  # the old rows are the base's, untouched
    mean = original.float().mean(0).to(torch.bfloat16)
    for row in (259, 260):  # the new rows left the mean they started from
        assert (merged[row].float() - mean.float()).abs().max() > 1e-3
    assert not embed.base_layer.weight.requires_grad


def test_peft_loads_adapter_onto_resized_base(trained):
    base, run = trained
    ids = torch.tensor([[1, 259, 70, 80, 260, 259, 90, 5]])
    ours, _ = load_quantized(base, device="cpu", target_modules=["q_proj", "v_proj"])
    load_adapter(ours, run / "adapter")
    with torch.no_grad():
        got = ours(input_ids=ids).logits.float()
    reference = PeftModel.from_pretrained(_resized_reference(base), run / "adapter").eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
    # the base's linears are 4-bit in ours, full precision in the reference: compare the adapter's effect on the rows
    # the adapter alone decides (the new tokens' logits columns move with the trained lm_head rows)
    assert got.shape == expected.shape == (1, 8, 261)
    loaded = get_peft_model_state_dict(reference)
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    for key in (EMBED, HEAD):  # peft took our rows as they are
        assert torch.equal(loaded[key].float(), saved[key].float())
    assert rel_err(got, expected) < 0.15  # NF4 vs fp32 base on the tiny model


def test_peft_parity_on_same_quantized_base(trained):
    """peft's trainable-token layers over our own quantized, resized base give our logits."""
    base, run = trained
    from peft import LoraConfig, get_peft_model

    from qlora_lite.model.embeddings import resize_embeddings

    ids = torch.tensor([[1, 259, 70, 80, 260, 259, 90, 5]])
    ours, _ = load_quantized(base, device="cpu", target_modules=["q_proj", "v_proj"])
    load_adapter(ours, run / "adapter")
    plain, _ = load_quantized(base, device="cpu", target_modules=["q_proj", "v_proj"])
    resize_embeddings(plain, 261)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    peft_model = get_peft_model(
        plain,
        LoraConfig(
            r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
            trainable_token_indices=config["trainable_token_indices"],
        ),
    )  # fmt: skip
    from peft.utils import set_peft_model_state_dict

    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, {k: v.float() for k, v in tensors.items()})
    assert not result.unexpected_keys
    for module in peft_model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        got = ours.eval()(input_ids=ids).logits.float()
        expected = peft_model.eval()(input_ids=ids).logits.float()
    assert rel_err(got, expected) < TOLERANCE


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama", vocab_size=OLD_ROWS)
    straight = _settings(base, tmp_path, "straight", steps=4)
    train(config_from_dict(straight), progress=False)
    stopped = _settings(base, tmp_path, "stopped", steps=2)
    train(config_from_dict(stopped), progress=False)
    resumed = dict(stopped, train=dict(stopped["train"], max_steps=4))
    train(config_from_dict(resumed), resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and EMBED in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    """The merged fp16 export of the new-tokens adapter."""
    from qlora_lite.export.hf_dir import run_export

    base, run = trained
    out = tmp_path_factory.mktemp("merged-tokens") / "merged"
    run_export(base, run / "adapter", out, device="cpu")
    return out


def test_merged_export_grows_vocabulary_and_writes_trained_rows(trained, merged):
    base, run = trained
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.vocab_size == 261 == json.loads((merged / "config.json").read_text())["vocab_size"]
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.shape[0] == head.shape[0] == 261 and embed.dtype == torch.float16
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [260]
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert torch.equal(embed[259:].detach(), saved[EMBED].to(torch.float16))
    assert torch.equal(head[259:].detach(), saved[HEAD].to(torch.float16))
    original = load_file(base / "model.safetensors")
    key = next(k for k in original if k.endswith("embed_tokens.weight"))
    assert torch.equal(embed[:OLD_ROWS].detach(), original[key].to(torch.float16))  # old rows: the base's, cast


def test_merged_export_logits_match_adapter_on_quantized_base(trained, merged):
    from qlora_lite.export.verify import (
        VERIFY_TOLERANCE,
        compare_logits,
        merged_logits,
        reference_logits,
        verify_merged,
    )

    base, run = trained
    ids = torch.tensor([[1, 259, 70, 80, 260, 259, 90, 5], [260, 3, 259, 259, 44, 260, 7, 258]])
    expected = reference_logits(base, run / "adapter", ids)
    actual, dtype = merged_logits(merged, ids)
    assert dtype == "float16" and actual.shape == expected.shape == (2, 8, 261)
    largest, _ = compare_logits(actual, expected)
    assert largest < VERIFY_TOLERANCE
    assert verify_merged(merged, base, run / "adapter").max_rel < VERIFY_TOLERANCE


def test_added_rows_not_trained_are_the_mean_as_in_training(trained, tmp_path):
    """An added row the adapter does not train is written as the loader's mean row (fp32 mean of the bf16 rows)."""
    from qlora_lite.export.hf_dir import run_export
    from qlora_lite.model.embeddings import _mean_grown

    base, run = trained
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in (run / "adapter").iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["qlora_lite"]["vocab_size"] = 264  # three more rows than the adapter trains
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    run_export(base, adapter, tmp_path / "merged", device="cpu", dtype="bfloat16")
    out = load_file(tmp_path / "merged" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        expected = _mean_grown(original[key].to(torch.bfloat16), 264)
        assert out[key].shape == (264, 64)
        assert torch.equal(out[key][261:], expected[261:])
        assert torch.equal(out[key][:OLD_ROWS], expected[:OLD_ROWS])
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 264


def test_cli_export_verify_passes_on_new_tokens(trained, tmp_path, capsys):
    from qlora_lite.cli import main

    base, run = trained
    out = tmp_path / "merged"
    code = main(["export", "--base", str(base), "--adapter", str(run / "adapter"), "--out", str(out), "--verify"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "largest relative logit difference" in printed


def test_merged_export_generates_the_new_token(tiny_model_dir, tmp_path):
    """Trained to end answers with the added <|im_end|>, the merged fp16 export (plain transformers) emits it."""
    from qlora_lite import export_merged

    base = tiny_model_dir("llama", vocab_size=OLD_ROWS)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i % 4}:", "completion": " ok<|im_end|>"}) + "\n" for i in range(16))
    )
    config = {
        "model": str(base), "output_dir": str(tmp_path / "run"), "lora": {"r": 8, "alpha": 16},
        "data": {"train": str(data), "max_seq_len": 32, "add_special_tokens": NEW, "resize_embeddings": True},
        "train": {"max_steps": 40, "micro_batch_size": 4, "grad_accum": 1, "lr": 2e-2, "optimizer": "adamw",
                  "warmup_steps": 0, "schedule": "constant", "save_every": 0, "eval_every": 0},
    }  # fmt: skip
    train(config_from_dict(config), progress=False)
    merged = export_merged(base, tmp_path / "run" / "adapter", tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = tokenizer("q1:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)[0, ids.shape[1] :].tolist()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end == OLD_ROWS + 1 and end in out, out  # a token the base's vocabulary never had
    answer = tokenizer(" ok", add_special_tokens=False).input_ids  # [" ", "o", "k"]
    assert answer[: out.index(end)] == out[: out.index(end)], out  # what comes before it is the answer's start
