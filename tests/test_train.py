"""Training loop: checkpointing gradients, accumulation, schedule, loss going down, NaN stop, run dir, config errors."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import yaml

from qlora_lite.cli import main
from qlora_lite.config.load import config_from_dict, load_config
from qlora_lite.config.settings import TrainConfig, valid_keys
from qlora_lite.data.batching import BatchOrder, collate
from qlora_lite.data.encode import build_dataset
from qlora_lite.errors import ConfigError, TrainingError
from qlora_lite.model.loader import load_quantized
from qlora_lite.model.lora import apply_lora, lora_layers
from qlora_lite.model.tiny import make_tokenizer
from qlora_lite.training.checkpoint import checkpoint_dirs
from qlora_lite.training.checkpointing import enable_gradient_checkpointing
from qlora_lite.training.loop import train
from qlora_lite.training.loss import causal_lm_loss
from qlora_lite.training.optim import AdapterOptimizer
from qlora_lite.training.schedule import lr_at
from qlora_lite.training.step import accumulate_gradients
from tests.helpers import rel_err


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A task a random tiny model can learn quickly: random letters in, always the same answer out."""
    root = tmp_path_factory.mktemp("toy-data")
    rng = random.Random(0)
    lines = []
    for _ in range(48):
        word = "".join(rng.choice("abcdefgh") for _ in range(6))
        lines.append(json.dumps({"prompt": f"{word} ->", "completion": " ok!"}))
    (root / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (root / "eval.jsonl").write_text("\n".join(lines[40:]) + "\n")
    return root


def _config(model_dir, data_dir, out, **train) -> TrainConfig:
    settings = dict(
        max_steps=6,
        micro_batch_size=4,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=2,
        log_every=1,
        eval_every=3,
        save_every=3,
        optimizer="adamw",
    )
    settings.update(train)
    return config_from_dict(
        {
            "model": str(model_dir),
            "output_dir": str(out),
            "lora": {"r": 8, "alpha": 16},
            "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "max_seq_len": 32},
            "train": settings,
        }
    )


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_model_dir):
    """Non-reentrant per-layer checkpointing over a frozen 4-bit base: A and B get the gradients of a plain backward."""
    model, _ = load_quantized(tiny_model_dir("llama"), bits=4, device="cpu")
    apply_lora(model, r=4, alpha=8, seed=0)
    with torch.no_grad():  # B starts at zero, which would make A's gradient zero; give both a real gradient
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    model.train()

    def grads():
        loss = causal_lm_loss(model, ids, ids)
        loss.backward()
        out = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    plain = grads()
    enable_gradient_checkpointing(model)
    assert [getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers] == [True, True]
    checkpointed = grads()
    assert len(plain) == 2 * len(lora_layers(model)) == 2 * 7 * 2
    for name, g in plain.items():
        assert g.abs().sum() > 0, f"{name} got no gradient"
        assert rel_err(checkpointed[name], g) <= 1e-6, name


def test_lr_schedule_warmup_cosine_and_constant():
    s = TrainConfig().train
    s.lr, s.warmup_steps, s.max_steps = 1.0, 4, 14
    assert [lr_at(k, s) for k in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_at(5, s) == 1.0  # first cosine step at full lr
    assert lr_at(10, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert 0 < lr_at(14, s) < 0.03  # the last step still learns
    s.schedule = "constant"
    assert lr_at(14, s) == 1.0


@pytest.mark.slow
def test_loss_goes_down_and_run_dir_matches_the_design(tiny_model_dir, toy_data, tmp_path):
    out = tmp_path / "run"
    # initializer_range 0.2: with the default 0.02 a random tiny model's logits cannot move far from uniform.
    result = train(
        _config(
            tiny_model_dir("llama", initializer_range=0.2),
            toy_data,
            out,
            max_steps=12,
            eval_every=6,
            save_every=4,
            keep_checkpoints=2,
        )
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 13))
    assert all({"step", "loss", "lr"} <= set(r) for r in train_lines)
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    # A random base predicts ~uniformly (ln 259 = 5.56); the fixed answer is learned.
    assert train_lines[0]["loss"] > 5.0
    assert result.eval_loss < 0.5 * train_lines[0]["loss"]
    assert result.eval_loss == evals[-1]["eval_loss"] and result.steps == 12
    assert [step for step, _ in checkpoint_dirs(out)] == [8, 12]
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "optimizer.pt",
        "rng.safetensors",
        "trainer_state.json",
        "COMPLETE",
    ):
        assert (out / "checkpoints" / "step-12" / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 12 and saved["lora"]["r"] == 8
    assert load_config(out / "config.yaml").to_dict() == saved
    assert not list(out.rglob("*.tmp"))


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, tok):
    """Micro-batches of unequal target counts accumulate to the gradient of one token-weighted mean loss."""
    model, _ = load_quantized(tiny_model_dir("llama"), bits=4, device="cpu")
    apply_lora(model, r=4, alpha=8, seed=0, adapter_dtype=torch.float32)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    model.train()
    records = [(str(i), {"prompt": f"q{i} ", "completion": "z" * n}) for i, n in enumerate((1, 2, 9, 12))]
    examples = build_dataset(records, tok, max_seq_len=32).examples
    optimizer = AdapterOptimizer([p for p in model.parameters() if p.requires_grad], "adamw")
    cpu = torch.device("cpu")

    def master_grads():
        grads = torch.cat([m.grad.flatten().clone() for m in optimizer.masters])
        optimizer.zero_grad()
        return grads

    loss_accum = accumulate_gradients(
        model, [collate(examples[:2], 0), collate(examples[2:], 0)], optimizer, cpu, bf16=False
    )
    accumulated = master_grads()
    loss_one = accumulate_gradients(model, [collate(examples, 0)], optimizer, cpu, bf16=False)
    one_batch = master_grads()
    # Averaging per micro-batch instead would weight the 2 short examples like the 2 long ones.
    loss_wrong = 0.5 * accumulate_gradients(model, [collate(examples[:2], 0)], optimizer, cpu, bf16=False)
    loss_wrong += 0.5 * accumulate_gradients(model, [collate(examples[2:], 0)], optimizer, cpu, bf16=False)
    optimizer.zero_grad()
    assert loss_accum == pytest.approx(loss_one, rel=1e-3)
    assert rel_err(accumulated, one_batch) < 1e-2
    assert abs(loss_wrong - loss_one) > 10 * abs(loss_accum - loss_one)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, toy_data, tmp_path):
    """An infinite embedding row yields a NaN loss when its token first appears (step 3 here)."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "poisoned"
    src = tiny_model_dir("llama")
    for f in src.iterdir():
        (base / f.name).parent.mkdir(exist_ok=True)
        (base / f.name).write_bytes(f.read_bytes())
    order = BatchOrder(3, 1, seed=0)
    third = [order.next_indices()[0] for _ in range(3)][2]
    data = tmp_path / "data"
    data.mkdir()
    texts = ["aaaa bbbb", "cccc dddd", "eeee ffff"]
    texts[third] = "eeee ~~~~"  # '~' appears only in the record trained on at step 3
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    weights = load_file(base / "model.safetensors")
    weights["model.embed_tokens.weight"][make_tokenizer().convert_tokens_to_ids("~")] = float("inf")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})

    cfg = _config(
        base, data, tmp_path / "run", max_steps=6, micro_batch_size=1, grad_accum=1, save_every=1, eval_every=0
    )
    cfg.data.eval = ""
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan.*last good checkpoint is .*step-2"):
        train(cfg)
    assert [s for s, _ in checkpoint_dirs(tmp_path / "run")] == [1, 2]
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]


def test_config_errors(tiny_model_dir, toy_data, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_model_dir("llama"), toy_data, tmp_path / "run").to_dict()))
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'; valid keys are: .*train.lr"):
        load_config(cfg_path, {"train.learning_rate": "1e-4"})
    with pytest.raises(ConfigError, match=r"train.schedule is 'linear'"):
        load_config(cfg_path, {"train.schedule": "linear"})
    with pytest.raises(ConfigError, match=r"data.max_seq_len is 4096, longer than the model's context of 256 tokens"):
        train(load_config(cfg_path, {"data.max_seq_len": "4096"}))
    train(load_config(cfg_path, {"train.max_steps": "1"}))
    with pytest.raises(ConfigError, match=r"already holds a training run; pass --resume"):
        train(load_config(cfg_path, {"train.max_steps": "1"}))
    with pytest.raises(ConfigError, match=r"was made with lora.r=8 but this config has lora.r=4"):
        train(load_config(cfg_path, {"train.max_steps": "2", "lora.r": "4"}), resume=True)


def test_a_run_dir_in_use_is_refused(tiny_model_dir, toy_data, tmp_path):
    from qlora_lite.errors import LockedError
    from qlora_lite.io.lock import DirectoryLock

    cfg = _config(tiny_model_dir("llama"), toy_data, tmp_path / "run", max_steps=1)
    with DirectoryLock(tmp_path / "run", purpose="another train"):
        with pytest.raises(LockedError, match=r"run is in use by pid \d+ \(another train\)"):
            train(cfg)
    assert train(cfg).steps == 1  # free again once the holder is gone


def test_cli_train_refuses_bad_input_with_exit_2_and_documents_every_key(tiny_model_dir, toy_data, tmp_path, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_model_dir("llama"), toy_data, tmp_path / "run").to_dict()))
    assert main(["train", str(cfg_path), "--lora.rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'lora.rank'" in err and "lora.r," in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    assert main(["train", str(cfg_path), "--data.train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 2 is not valid JSON" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for key in valid_keys():
        assert f"--{key} (default " in help_text, key
    assert main(["train", str(cfg_path), "--train.max_steps", "2", "--train.eval_every", "1"]) == 0
    out = capsys.readouterr().out
    assert "eval loss" in out and "run summary" in out


# ------------------------------------------------------------------------------------------ demo task
@pytest.fixture(scope="module")
def demo_cli_run(tmp_path_factory):
    """`qlora-lite demo` once for this module: (exit code, console output, demo.json)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "out"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--out", str(out)])
    return code, buffer.getvalue(), json.loads((out / "demo.json").read_text())


def test_demo_teaches_the_4bit_base_the_shift_task(demo_cli_run):
    from pathlib import Path

    code, text, demo = demo_cli_run
    assert code == 0
    assert demo["pretrain_copy_loss"] < 0.05  # the shipped base really learned to copy
    assert "base: shipped tiny model (copy task, loss" in text and "pre-train" not in text
    assert (Path(demo["base_dir"]) / "model.safetensors").is_file()
    assert demo["eval_loss_before"] > 3.0 and demo["eval_loss_after"] < 0.1
    assert demo["accuracy_before"] == 0.0 and demo["accuracy_after"] >= 0.95
    # the merged fp16 export is part of the demo: it must have run, and plain transformers must answer with it
    assert demo["merge_note"] is None, demo["merge_note"]
    assert demo["merged_dir"] and (Path(demo["merged_dir"]) / "config.json").is_file()
    for sample in demo["samples"]:
        assert sample["after"] == sample["expected"] != sample["before"]
        assert sample["merged"] == sample["expected"], sample
    assert "exact answers" in text and "shift hello =" in text and "ifmmp" in text


@pytest.mark.slow
def test_bf16_adapters_with_fp32_masters_match_fp32_adapters_on_the_demo_task(demo_cli_run, tmp_path):
    """Stored in bf16, A and B train as well as fp32 adapters: no update is lost to bf16 rounding."""
    from pathlib import Path

    from qlora_lite.demo.run import demo_config

    _, _, demo = demo_cli_run
    out = Path(demo["out_dir"])
    cfg = demo_config(Path(demo["base_dir"]), out / "data", tmp_path / "fp32", demo["train_steps"], 0, "float32")
    fp32 = train(cfg)
    bf16_loss = demo["eval_loss_after"]
    assert abs(bf16_loss - fp32.eval_loss) / fp32.eval_loss < 0.03, (bf16_loss, fp32.eval_loss)


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "is not empty and was not made by the demo" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_example_script_fine_tunes_a_local_model_dir_with_the_example_config(tiny_model_dir, tmp_path, capsys):
    import re
    import runpy
    from pathlib import Path

    import qlora_lite

    examples = Path(__file__).resolve().parents[1] / "examples"
    script = runpy.run_path(str(examples / "finetune_local.py"), run_name="example")
    model_dir = tiny_model_dir("qwen2")
    code = script["main"](
        [
            "--model",
            str(model_dir),
            "--data",
            str(examples / "instructions.jsonl"),
            "--out",
            str(tmp_path / "run"),
            "--train.max_steps",
            "2",
            "--train.micro_batch_size",
            "2",
            "--data.max_seq_len",
            "256",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lora"]["dropout"] == 0.05 and saved["train"]["grad_accum"] == 4  # the example YAML's settings
    # the pre-flight memory report is printed, one row per component of the estimate for the run's own config
    assert "memory report for" in out and "predicted peak" in out, out
    report = qlora_lite.estimate_memory(qlora_lite.load_config(tmp_path / "run" / "config.yaml"))
    assert report.settings.seq_len == 256 and report.settings.batch_size == 2  # the command-line overrides
    assert re.findall(r"^  (\w+) +[\d.]+ GiB$", out, re.M) == list(report.components), out
