"""`lora.modules_to_save` (peft's semantics): whole modules train, saved under peft's keys, loaded by peft and by
`load_adapter`, resumed exactly, and merged into the export; new tokens train through the whole modules."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qlora_lite import load_adapter, load_quantized
from qlora_lite.config.load import config_from_dict
from qlora_lite.errors import QloraLiteError
from qlora_lite.training.loop import train

HEAD_KEY = "base_model.model.lm_head.weight"  # peft 0.21's saved key, adapter name stripped
EMBED_KEY = "base_model.model.model.embed_tokens.weight"


def _settings(base, tmp_path, out: str, steps: int = 2, modules=("lm_head",), new_tokens=()) -> dict:
    rows = [{"prompt": f"q{i}: ", "completion": f"answer {i} " * 3} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": str(tmp_path / "train.jsonl"), "max_seq_len": 32}
    if new_tokens:
        data.update(add_special_tokens=list(new_tokens), resize_embeddings=True)
    return {
        "model": str(base),
        "output_dir": str(tmp_path / out),
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": list(modules)},
        "data": data,
        "train": {
            "max_steps": steps, "micro_batch_size": 2, "lr": 1e-2, "optimizer": "adamw", "seed": 3,
            "warmup_steps": 0, "schedule": "constant", "log_every": 1, "save_every": 2,
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """(base dir, run dir) of a 2-step run training lm_head whole on an untied tiny llama."""
    base = tiny_model_dir("llama", tie_word_embeddings=False)
    tmp = tmp_path_factory.mktemp("modules-to-save")
    train(config_from_dict(_settings(base, tmp, "run")), progress=False)
    return base, tmp / "run"


def _base_head(base) -> torch.Tensor:
    original = load_file(base / "model.safetensors")
    return original["lm_head.weight"]


def test_lm_head_trains_and_is_saved_under_peft_key(trained):
    base, run = trained
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert HEAD_KEY in saved and EMBED_KEY not in saved
    before = _base_head(base).to(torch.bfloat16).float()
    assert saved[HEAD_KEY].shape == before.shape
    assert not torch.equal(saved[HEAD_KEY].float(), before)  # two steps moved it


def test_peft_loads_modules_to_save_cleanly(trained):
    base, run = trained
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(reference, run / "adapter")
    messages = [str(w.message) for w in caught]
    # peft warns "Found missing adapter keys" / "unexpected keys" (our extra config key is a separate notice)
    assert not [m for m in messages if " keys" in m.lower()], messages
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    head = model.base_model.model.lm_head
    assert torch.equal(head.modules_to_save["default"].weight.float(), saved[HEAD_KEY].float())
    ours, _ = load_quantized(base, device="cpu", target_modules=["q_proj", "v_proj"])
    load_adapter(ours, run / "adapter")
    assert torch.equal(ours.lm_head.weight.float(), saved[HEAD_KEY].float())


def test_resume_gives_identical_adapter(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama", tie_word_embeddings=False)
    train(config_from_dict(_settings(base, tmp_path, "straight", steps=4)), progress=False)
    stopped = _settings(base, tmp_path, "stopped", steps=2)
    train(config_from_dict(stopped), progress=False)
    train(config_from_dict(dict(stopped, train=dict(stopped["train"], max_steps=4))), resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and HEAD_KEY in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_merged_export_takes_lm_head_from_adapter(trained, tmp_path):
    from qlora_lite.export.hf_dir import run_export

    base, run = trained
    out = tmp_path / "merged"
    run_export(base, run / "adapter", out, device="cpu", dtype="bfloat16")
    merged = load_file(out / "model.safetensors")
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert torch.equal(merged["lm_head.weight"], saved[HEAD_KEY].to(torch.bfloat16))
    assert not torch.equal(merged["lm_head.weight"], _base_head(base).to(torch.bfloat16))


def test_new_tokens_train_whole_modules_instead_of_rows(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama", tie_word_embeddings=False, vocab_size=259)
    settings = _settings(base, tmp_path, "run", modules=("embed_tokens", "lm_head"), new_tokens=("<|x|>",))
    train(config_from_dict(settings), progress=False)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] is None and config["qlora_lite"]["vocab_size"] == 260
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert saved[EMBED_KEY].shape[0] == saved[HEAD_KEY].shape[0] == 260
    assert not any("trainable_tokens_delta" in k for k in saved)
    ours, _ = load_quantized(base, device="cpu", target_modules=["q_proj", "v_proj"])
    load_adapter(ours, tmp_path / "run" / "adapter")
    assert torch.equal(ours.get_input_embeddings().weight.float(), saved[EMBED_KEY].float())


def test_tied_model_is_refused(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama", tie_word_embeddings=True)
    with pytest.raises(QloraLiteError, match="ties its embedding and lm_head"):
        train(config_from_dict(_settings(base, tmp_path, "run")), progress=False)


def test_unknown_module_is_refused(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama", tie_word_embeddings=False)
    with pytest.raises(QloraLiteError, match="matches no module"):
        train(config_from_dict(_settings(base, tmp_path, "run", modules=("no_such_head",))), progress=False)


def test_memory_report_counts_the_whole_modules_gradients_and_state(tiny_model_dir):
    """lm_head trained whole adds its fp32 master, AdamW moments, bf16 gradient and fp32 accumulation; its
    weight itself is the base's own (already counted once)."""
    from qlora_lite.memory.report import estimate_memory

    base = tiny_model_dir("llama", tie_word_embeddings=False)
    common = dict(device="cpu", optimizer="adamw", grad_accum=2, batch_size=1, seq_len=16, rank=4)
    plain = estimate_memory(base, **common)
    whole = estimate_memory(base, **common, modules_to_save=("lm_head",))
    import json

    config = json.loads((base / "config.json").read_text())
    n = config["vocab_size"] * config["hidden_size"]  # lm_head.weight (no bias)
    assert whole.size("unquantized_weights") == plain.size("unquantized_weights")
    assert whole.size("lora_adapters") == plain.size("lora_adapters")
    assert whole.size("optimizer_state") - plain.size("optimizer_state") == 4 * n + 2 * 4 * n  # master, moments, step
    assert whole.size("gradient_accumulation") - plain.size("gradient_accumulation") == 4 * n
    assert whole.size("lora_gradients") - plain.size("lora_gradients") == 2 * n
