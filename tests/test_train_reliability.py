"""Training runs that meet the unexpected: data changed under a checkpoint, a longer max_steps on resume, a
grad_accum far beyond the data, SIGTERM / Ctrl-C, and the Python API called with the wrong arguments."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from qlora_lite import apply_lora, load_quantized
from qlora_lite.cli import main
from qlora_lite.config.load import config_from_dict
from qlora_lite.config.settings import DataConfig, TrainConfig, TrainSettings
from qlora_lite.data.batching import collate
from qlora_lite.data.encode import build_dataset
from qlora_lite.errors import ConfigError, DataError, TrainingError
from qlora_lite.io.atomic import file_sha256
from qlora_lite.io.faults import ENOSPC_ENV, KILL_ENV
from qlora_lite.io.safetensors import SafetensorsFile
from qlora_lite.training import run, step
from qlora_lite.training.checkpoint import checkpoint_dirs, schedule_notices
from qlora_lite.training.interrupt import Interrupted
from qlora_lite.training.loop import train
from qlora_lite.training.optim import AdapterOptimizer
from qlora_lite.training.reporter import Reporter
from qlora_lite.training.step import NonFiniteStepError, train_step

RECORDS = [{"prompt": f"item {i}: ", "completion": "y" * (1 + i % 4) + f" #{i}"} for i in range(8)]


@pytest.fixture(autouse=True)
def _no_fault_points(monkeypatch):
    for name in (KILL_ENV, ENOSPC_ENV):
        monkeypatch.delenv(name, raising=False)


def _data(path: Path, records=RECORDS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _settings(model_dir: Path, data: Path, out: Path, **train_settings) -> dict:
    settings = dict(
        max_steps=4, micro_batch_size=2, grad_accum=1, lr=5e-3, warmup_steps=1, optimizer="adamw", log_every=1,
        eval_every=0, save_every=2, keep_checkpoints=5, seed=3,
    )  # fmt: skip
    settings.update(train_settings)
    return {
        "model": model_dir,
        "output_dir": out,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state is part of an exact resume
        "data": {"train": data, "max_seq_len": 32},
        "train": settings,
    }


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    st = SafetensorsFile(path / "adapter_model.safetensors")
    return {k: st.read(k) for k in st.keys()}


def _same_adapter(a: Path, b: Path) -> None:
    left, right = _adapter(a), _adapter(b)
    assert left.keys() == right.keys() and left
    for name, tensor in left.items():
        assert torch.equal(right[name], tensor), name


def _losses(out: Path) -> list[tuple]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows if "loss" in r]


class Recorder(Reporter):
    def __init__(self):
        self.notices: list[str] = []

    def on_start(self, info: dict) -> None:
        self.notices = list(info["notices"])


# ------------------------------------------------------------------------------ data changed on resume
def test_resume_refuses_changed_data_unless_allowed_and_says_what_a_longer_max_steps_changes(tiny_model_dir, tmp_path):
    data, out = _data(tmp_path / "train.jsonl"), tmp_path / "run"
    # Path objects set in Python are taken like the strings of a YAML file
    config = config_from_dict(_settings(str(tiny_model_dir("llama")), str(data), str(out), max_steps=2))
    config.model, config.data.train, config.output_dir = tiny_model_dir("llama"), data, out
    train(config)
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    recorded = {"file": str(data), "bytes": data.stat().st_size, "sha256": file_sha256(data)}
    assert state["data_files"] == {"train": recorded}

    _data(data, RECORDS + [{"text": "a record added after the checkpoint"}])
    longer = config_from_dict(_settings(str(tiny_model_dir("llama")), str(data), str(out), max_steps=4))
    with pytest.raises(DataError) as info:
        train(longer, resume=True)
    message = str(info.value)
    assert message.startswith(
        f"data.train file {data} changed since checkpoint {out / 'checkpoints' / 'step-2'} was written "
        f"({recorded['bytes']} bytes, sha256 {recorded['sha256'][:12]} then; {data.stat().st_size} bytes, sha256 "
    )
    assert message.endswith(
        "; put the original file back, start a new output_dir, or pass --allow-data-change "
        "(allow_data_change=True) to resume on the new data."
    )
    assert [s for s, _ in checkpoint_dirs(out)] == [2]  # refused before anything was touched

    reporter = Recorder()
    result = train(longer, resume=True, allow_data_change=True, reporter=reporter)
    assert result.steps == 4 and result.resumed_from == 2 and result.data.records == 9
    assert result.notices == reporter.notices and len(result.notices) == 2
    assert result.notices[0].startswith(f"data.train file {data} changed since checkpoint")
    assert result.notices[0].endswith(
        "resuming on the new data as --allow-data-change asks: the batch order continues from the checkpoint's "
        "position over the new records"
    )
    assert result.notices[1] == (
        "train.max_steps changed from 2 to 4: the cosine schedule now decays over 4 steps, so the learning rate "
        "from step 3 on differs from the first run's"
    )
    latest = json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert latest["data_files"]["train"]["sha256"] == file_sha256(data)  # later resumes compare with the new file

    # a max_steps the checkpoint is already past is refused: the run would end beyond what was asked
    shorter = config_from_dict(_settings(str(tiny_model_dir("llama")), str(data), str(out), max_steps=3))
    with pytest.raises(ConfigError, match=r"train.max_steps is 3 but checkpoint .*step-4 is at step 4; set "):
        train(shorter, resume=True)


def test_schedule_notices_say_which_steps_change():
    cosine = TrainSettings(max_steps=200, warmup_steps=10, lr=2e-4)
    state = {"step": 50, "schedule": {"name": "cosine", "lr": 2e-4, "warmup_steps": 10, "max_steps": 100}}
    path = Path("run/checkpoints/step-50")
    assert schedule_notices(state, cosine, path) == [
        "train.max_steps changed from 100 to 200: the cosine schedule now decays over 200 steps, so the learning "
        "rate from step 51 on differs from the first run's"
    ]
    constant = TrainSettings(max_steps=200, warmup_steps=10, lr=1e-4, schedule="constant")
    assert schedule_notices({**state, "schedule": {**state["schedule"], "name": "constant"}}, constant, path) == [
        "train.max_steps changed from 100 to 200: the constant schedule does not depend on it for steps 51 to 200, "
        "so only the run's length changes",
        "train.lr changed from 0.0002 to 0.0001: the learning rate from step 51 on follows the new setting",
    ]
    same = TrainSettings(max_steps=100, warmup_steps=10, lr=2e-4)
    assert schedule_notices(state, same, path) == []
    with pytest.raises(ConfigError, match=r"train.max_steps is 40 but checkpoint run/checkpoints/step-50 is at"):
        schedule_notices(state, TrainSettings(max_steps=40), path)


# --------------------------------------------------------------------------- micro-batches on demand
def test_micro_batches_are_built_one_at_a_time_and_a_step_beyond_the_data_is_said(
    tiny_model_dir, tmp_path, monkeypatch
):
    data = _data(tmp_path / "two.jsonl", RECORDS[:2])
    events: list[str] = []
    real_collate, real_forward = run.collate, step.forward_loss_sum

    def collate_logged(*args, **kwargs):
        events.append("collate")
        return real_collate(*args, **kwargs)

    def forward_logged(*args, **kwargs):
        events.append("forward")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(run, "collate", collate_logged)
    monkeypatch.setattr(step, "forward_loss_sum", forward_logged)
    settings = _settings(str(tiny_model_dir("llama")), str(data), str(tmp_path / "run"), max_steps=1)
    settings["train"].update(micro_batch_size=1, grad_accum=6)
    result = train(config_from_dict(settings))
    assert events == ["collate", "forward"] * 6  # never more than one micro-batch built ahead of its forward
    assert result.notices == [
        "a step of train.grad_accum = 6 micro-batches is longer than one pass over the training data "
        "(2 micro-batches of up to 1 of its 2 sequences), so each step goes over the data 3 times; set "
        "train.grad_accum to 2 or less for at most one pass per step"
    ]


@pytest.fixture(scope="module")
def tiny_step(tiny_model_dir):
    """(fresh model + optimizer factory, two micro-batches of the tiny tokenizer)."""
    model_dir = tiny_model_dir("llama")

    def fresh():
        model, _ = load_quantized(model_dir, device="cpu")
        apply_lora(model, r=4, alpha=8, dropout=0.1, seed=0)
        model.train()
        return model, AdapterOptimizer(model.parameters(), "adamw", lr=1e-3)

    _, tokenizer = load_quantized(model_dir, device="cpu")
    ds = build_dataset([(f"r{i}", r) for i, r in enumerate(RECORDS[:4])], tokenizer, 32)
    return fresh, [collate(ds.examples[:2], 0), collate(ds.examples[2:], 0)]


def test_a_streamed_step_is_bit_identical_to_a_listed_one(tiny_step):
    fresh, batches = tiny_step
    results = []
    for streamed in (False, True):
        torch.manual_seed(5)
        model, optimizer = fresh()
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        given = (b for b in batches) if streamed else list(batches)
        result = train_step(
            model, optimizer, given, torch.device("cpu"), bf16=False, lr=1e-2, targets=targets if streamed else None
        )
        results.append((result, [m.detach().clone() for m in optimizer.masters]))
    (listed, listed_masters), (streamed, streamed_masters) = results
    assert listed == streamed
    assert all(torch.equal(a, b) for a, b in zip(listed_masters, streamed_masters))

    model, optimizer = fresh()
    with pytest.raises(TrainingError, match=r"the micro-batches hold \d+ target tokens but the step was normalised by"):
        train_step(model, optimizer, iter(batches), torch.device("cpu"), targets=1)


def test_a_non_finite_or_overflowing_learning_rate_never_reaches_the_weights(tiny_step):
    fresh, batches = tiny_step
    cpu = torch.device("cpu")
    model, optimizer = fresh()
    before = [m.detach().clone() for m in optimizer.masters]
    for lr in (float("nan"), float("inf"), -1.0, 0.0):
        with pytest.raises(TrainingError, match=r"the learning rate is .*; it must be a finite positive number"):
            train_step(model, optimizer, batches, cpu, lr=lr)
    assert all(torch.equal(a, b) for a, b in zip(before, optimizer.masters))
    # lr=1e30 (the schema refuses it, a caller of train_step may not): the first update is finite but huge, the next
    # loss overflows to NaN and the step is refused before its update, so no NaN ever reaches an adapter
    train_step(model, optimizer, batches, cpu, lr=1e30)
    huge = [m.detach().clone() for m in optimizer.masters]
    assert all(torch.isfinite(m).all() for m in huge)
    with pytest.raises(NonFiniteStepError, match="training stopped before applying this step"):
        train_step(model, optimizer, batches, cpu, lr=1e30)
    assert all(torch.equal(a, b) for a, b in zip(huge, optimizer.masters))
    # and the trainer never gets there: a TrainConfig built in Python is checked like a YAML file
    for lr, pattern in ((float("nan"), r"train.lr got nan; expected a finite number"), (1e30, r"train.lr is 1e\+30")):
        with pytest.raises(ConfigError, match=pattern):
            train(TrainConfig(model="m", data=DataConfig(train="d.jsonl"), train=TrainSettings(lr=lr)))


# ---------------------------------------------------------------------------------- SIGTERM and Ctrl-C
def _subprocess_train(cfg: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, ENOSPC_ENV)}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_lite", "train", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigterm_and_ctrl_c_say_what_was_saved_and_resume_ends_like_an_uninterrupted_run(
    tiny_model_dir, tmp_path, capsys, monkeypatch, request
):
    model_dir, data = tiny_model_dir("llama"), _data(tmp_path / "train.jsonl")
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    ref_cfg, cfg = tmp_path / "ref.yaml", tmp_path / "run.yaml"
    for path, run_dir in ((ref_cfg, ref_out), (cfg, out)):
        path.write_text(yaml.safe_dump(_settings(str(model_dir), str(data), str(run_dir), max_steps=16)))
    assert main(["train", str(ref_cfg)]) == 0

    # SIGTERM once the first checkpoint is complete, while later steps run
    process = _subprocess_train(cfg)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-2" / "COMPLETE").is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    found = re.fullmatch(
        rf"interrupted at step (\d+); the last complete checkpoint is {re.escape(str(out))}/checkpoints/step-(\d+); "
        r"run the same command with --resume to continue\.",
        lines[0],
    )
    assert found, lines[0]
    interrupted_at, saved = int(found.group(1)), int(found.group(2))
    assert saved == max(s for s, _ in checkpoint_dirs(out)) and saved <= interrupted_at < 16
    leftovers = [p.name for d in (out, out / "checkpoints") for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not (out / "adapter").exists()  # nothing half-written, nothing pretending to be final

    # Ctrl-C (SIGINT), in-process this time: the same sentence, exit 130, and the handlers come back afterwards.
    # Python's own SIGINT handler first: a suite started in the background by a non-interactive shell inherits SIGINT
    # ignored, which the command rightly keeps ignoring.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous_sigint))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real_fault_point = run.fault_point

    def ctrl_c_after(point: str, count: int) -> None:
        real_fault_point(point, count)
        if point == "after-checkpoint" and count == saved + 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(run, "fault_point", ctrl_c_after)
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == (
        f"interrupted at step {saved + 2}; the last complete checkpoint is {out / 'checkpoints' / f'step-{saved + 2}'}; "
        "run the same command with --resume to continue."
    )
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    monkeypatch.setattr(run, "fault_point", real_fault_point)

    assert main(["train", str(cfg), "--resume"]) == 0
    assert f"resuming from step {saved + 2}" in capsys.readouterr().out
    _same_adapter(ref_out / "adapter", out / "adapter")
    assert _losses(out) == _losses(ref_out)


def test_ctrl_c_in_the_python_api_is_a_keyboard_interrupt_that_names_the_checkpoint(
    tiny_model_dir, tmp_path, monkeypatch
):
    data, out = _data(tmp_path / "train.jsonl"), tmp_path / "run"
    real_fault_point = run.fault_point

    def ctrl_c_at_2(point: str, count: int) -> None:
        real_fault_point(point, count)
        if point == "after-checkpoint" and count == 2:
            raise KeyboardInterrupt  # what Python raises on Ctrl-C when no handler of ours is installed

    monkeypatch.setattr(run, "fault_point", ctrl_c_at_2)
    with pytest.raises(KeyboardInterrupt) as info:
        train(config_from_dict(_settings(str(tiny_model_dir("llama")), str(data), str(out))))
    assert isinstance(info.value, Interrupted) and not isinstance(
        info.value, Exception
    )  # `except Exception` lets it by
    assert info.value.exit_code == 130 and Interrupted("", signal.SIGTERM).exit_code == 143
    assert str(info.value) == (
        f"interrupted at step 2; the last complete checkpoint is {out / 'checkpoints' / 'step-2'}; "
        "run the same command with --resume to continue."
    )


# ------------------------------------------------------------------------------------ the Python API
def test_train_refuses_arguments_of_the_wrong_kind(tiny_model_dir, tmp_path):
    data = _data(tmp_path / "train.jsonl")
    good = config_from_dict(_settings(str(tiny_model_dir("llama")), str(data), str(tmp_path / "run")))
    png = tmp_path / "picture.yaml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    wrong = [
        ((good.to_dict(),), {}, r"train\(\) takes a TrainConfig or the path of a YAML config, not a dict"),
        ((5,), {}, r"not a int\."),
        ((None,), {}, r"not a NoneType\."),
        ((png,), {}, r"picture.yaml line 1 is not UTF-8 text"),
        ((data,), {}, r"train.jsonl"),  # JSONL is not a YAML mapping of settings
        ((str(tmp_path / ("x" * 300)),), {}, r"cannot be read \(File name too long\)"),
        (("bad\0name.yaml",), {}, r"is not a file name"),
        ((good,), {"resume": "yes"}, r"resume must be True or False, got 'yes'\."),
        ((good,), {"resume": True, "allow_data_change": 1}, r"allow_data_change must be True or False, got 1\."),
        ((good,), {"allow_data_change": True}, r"only applies when resuming; add --resume or drop it\."),
        ((good,), {"reporter": print}, r"reporter must be a qlora_lite.training.reporter.Reporter"),
    ]
    for args, kwargs, pattern in wrong:
        with pytest.raises(ConfigError, match=pattern):
            train(*args, **kwargs)
    for change, pattern in (
        ({"lr": "fast"}, r"train.lr got 'fast'; expected a finite number"),
        ({"lr": float("inf")}, r"train.lr got inf; expected a finite number"),
        ({"max_steps": 2.5}, r"train.max_steps got 2.5; expected a whole number"),
        ({"grad_accum": True}, r"train.grad_accum got True; expected a whole number"),
    ):
        bad = config_from_dict(_settings(str(tiny_model_dir("llama")), str(data), str(tmp_path / "run")))
        for key, value in change.items():
            setattr(bad.train, key, value)
        with pytest.raises(ConfigError, match=pattern):
            train(bad)
    below_a_file = config_from_dict(_settings(str(tiny_model_dir("llama")), str(data), str(data / "run")))
    with pytest.raises(ConfigError, match=r"output_dir .*train.jsonl/run cannot be made: .*train.jsonl is a file"):
        train(below_a_file)  # not the FileExistsError of mkdir
    assert not (tmp_path / "run").exists()  # every refusal came before the run dir was made


def test_load_quantized_and_apply_lora_refuse_wrong_arguments_with_config_errors(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    load_cases = [
        ({"model_path": 5}, r"load_quantized: model_path must be the path of a model directory"),
        ({"bits": "4"}, r"load_quantized: bits must be 4 or 8, got '4' \(str\)\."),
        ({"bits": 4.0}, r"bits must be 4 or 8, got 4.0 \(float\)"),
        ({"bits": 3}, r"bits is 3, but only 4 \(NF4/FP4\) and 8"),
        ({"quant_type": 4}, r"quant_type must be 'nf4' or 'fp4'"),
        ({"quant_type": "int4"}, r"quant.quant_type is 'int4'; use nf4 or fp4"),
        ({"double_quant": "yes"}, r"double_quant must be True or False"),
        ({"device": "gpu"}, r"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got 'gpu'"),
        ({"device": "meta"}, r"device 'meta' is not supported; use 'cpu' or 'cuda'"),
        ({"device": 1.5}, r"device must be"),
        ({"target_modules": 5}, r"target_modules must be 'all-linear', a regex string or a list of module names"),
        ({"target_modules": ["q_proj", 3]}, r"target_modules must be"),
        ({"blocksize": "64"}, r"blocksize must be a whole number"),
        ({"blocksize": 100}, r"quant.blocksize is 100"),
        ({"int8_threshold": float("nan")}, r"int8_threshold must be a finite number"),
        ({"trust_remote_code": "no"}, r"trust_remote_code must be True or False, got 'no'"),
        ({"load_tokenizer": None}, r"load_tokenizer must be True or False"),
    ]
    if not torch.cuda.is_available():
        load_cases.append(({"device": "cuda"}, r"device 'cuda' was asked for but torch sees no CUDA GPU; use 'cpu'"))
    for kwargs, pattern in load_cases:
        kwargs = {"model_path": model_dir, "device": "cpu", **kwargs}
        with pytest.raises(ConfigError, match=pattern):
            load_quantized(**kwargs)

    model, _ = load_quantized(model_dir, device="cpu")
    lora_cases = [
        ({"model": object()}, r"apply_lora: model must be a torch.nn.Module such as load_quantized returns"),
        ({"model": "model"}, r"model must be a torch.nn.Module"),
        ({"model": torch.nn.Linear(4, 4)}, r"the model is itself a linear layer"),
        ({"r": 0}, r"lora.r is 0; it must be a positive whole number"),
        ({"r": 2.5}, r"apply_lora: r must be a whole number such as 8 or 16, got 2.5 \(float\)\."),
        ({"r": "8"}, r"r must be a whole number"),
        ({"r": True}, r"r must be a whole number"),
        ({"alpha": float("nan")}, r"alpha must be a finite number such as 16 or 32, got nan"),
        ({"alpha": "32"}, r"alpha must be a finite number"),
        ({"alpha": 0}, r"lora.alpha is 0"),
        ({"dropout": 1.5}, r"lora.dropout is 1.5; it must be in \[0, 1\)"),
        ({"target_modules": 5}, r"target_modules must be 'all-linear', a regex string or a list of module names"),
        ({"target_modules": []}, r"target_modules must be"),
        ({"rslora": "yes"}, r"rslora must be True or False"),
        ({"adapter_dtype": torch.int8}, r"adapter_dtype must be torch.bfloat16, torch.float16 or torch.float32"),
        ({"adapter_dtype": "bfloat16"}, r"adapter_dtype must be"),
        ({"seed": 2**70}, r"seed must be in \["),
        ({"seed": "0"}, r"seed must be None or a whole number"),
    ]
    for kwargs, pattern in lora_cases:
        kwargs = {"model": model, **kwargs}
        with pytest.raises(ConfigError, match=pattern) as info:
            apply_lora(**kwargs)
        assert "\n" not in str(info.value) and str(info.value).endswith(".")
    assert getattr(model, "qlora_lora", None) is None  # nothing was half-applied
    assert isinstance(apply_lora(model, r=4, alpha=8.0, target_modules=("q_proj", "v_proj")), torch.nn.Module)
