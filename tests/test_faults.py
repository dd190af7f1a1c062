"""Reliability: a crash (SIGKILL), a write that fails part-way (injected ENOSPC) or a CUDA out-of-memory leaves
the previous checkpoint or output intact and nothing partial that could pass for complete; the next run says
what it found and carries on. Also the safety rules: no pickle loading, one writer per output dir.

SIGKILL needs real processes: three short subprocess runs through the CLI. Everything else runs in-process
through `qlora_lite.cli.main`, with the fault points of our own code switched on by environment variables.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from qlora_lite import apply_lora, load_quantized, save_adapter
from qlora_lite.cli import main
from qlora_lite.config.load import config_from_dict
from qlora_lite.io.faults import ENOSPC_ENV, KILL_ENV
from qlora_lite.io.lock import DirectoryLock
from qlora_lite.io.safetensors import SafetensorsFile
from qlora_lite.memory.advice import gib, parse_budget
from qlora_lite.memory.oom import GPU_MEMORY_ENV, OOM_ENV, advise_after_oom, memory_settings
from qlora_lite.memory.report import estimate_memory
from qlora_lite.model.lora import lora_layers
from qlora_lite.training.checkpoint import COMPLETE_MARKER, checkpoint_dirs, checkpoint_problem

from .helpers import hidden, one_error_line, snapshot

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_lite"
FAULT_ENVS = (KILL_ENV, ENOSPC_ENV, OOM_ENV, GPU_MEMORY_ENV)


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fault-data") / "train.jsonl"
    records = [{"prompt": f"item {i}: ", "completion": "y" * (1 + i % 4) + f" #{i}"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(autouse=True)
def _no_inherited_faults(monkeypatch):
    for name in FAULT_ENVS:
        monkeypatch.delenv(name, raising=False)


def write_config(path: Path, model_dir: Path, data_file: Path, out: Path, **train) -> Path:
    """A 4-step run (2 sequences per step, a checkpoint every 2 steps, all kept)."""
    settings = dict(
        max_steps=4,
        micro_batch_size=2,
        grad_accum=1,
        lr=5e-3,
        warmup_steps=1,
        optimizer="adamw",
        log_every=1,
        eval_every=0,
        save_every=2,
        keep_checkpoints=5,
        seed=3,
    )
    settings.update(train)
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(model_dir),
                "output_dir": str(out),
                "lora": {"r": 4, "alpha": 8},
                "data": {"train": str(data_file), "max_seq_len": 32},
                "train": settings,
            }
        )
    )
    return path


def cli_subprocess(*argv: str, **fault_env: str) -> subprocess.CompletedProcess:
    """`python -m qlora_lite ARGV` with the given fault points set (and no others)."""
    env = {k: v for k, v in os.environ.items() if k not in FAULT_ENVS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", **fault_env)
    return subprocess.run(
        [sys.executable, "-m", "qlora_lite", *argv], env=env, capture_output=True, text=True, timeout=300
    )


def adapter_weights(path: Path) -> dict[str, bytes]:
    """The adapter files of a final adapter dir (which also holds the tokenizer the run used), as bytes."""
    return {k: v for k, v in snapshot(path).items() if k.startswith("adapter_")}


# ---------------------------------------------------------------------------------- training: SIGKILL
@pytest.mark.slow
def test_sigkill_in_a_checkpoint_and_in_the_final_adapter_then_resume(tiny_model_dir, data_file, tmp_path, capsys):
    model_dir, out = tiny_model_dir("llama"), tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", model_dir, data_file, out)

    # 1. killed while step 4's checkpoint is being written: step 2 is the newest complete one
    killed = cli_subprocess("train", str(cfg), **{KILL_ENV: "in-checkpoint:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [s for s, _ in checkpoint_dirs(out)] == [2]
    half = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-4.")]
    assert len(half) == 1 and (half[0] / "optimizer.pt").is_file() and not (half[0] / COMPLETE_MARKER).exists()
    # the dead process's lock file stays beside the run dir, no longer locked
    assert (tmp_path / ".run.qlora-lite.lock").read_text().endswith("(qlora-lite train)")
    # an adapter/ from an earlier, shorter run: the final save below must leave it as it is
    old_adapter = snapshot(out / "checkpoints" / "step-2" / "adapter")
    (out / "adapter").mkdir()
    for name, data in old_adapter.items():
        (out / "adapter" / name).write_bytes(data)

    # 2. resumed (the dead process's lock does not block it) and killed in the middle of the final adapter save
    killed = cli_subprocess("train", str(cfg), "--resume", **{KILL_ENV: "in-final-adapter:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    said = " ".join(killed.stdout.split())
    assert "skipped incomplete checkpoint step-4 (no COMPLETE marker, its write was interrupted) and removed it" in said
    assert "resuming from step 2" in said
    assert [s for s, _ in checkpoint_dirs(out)] == [2, 4]
    assert snapshot(out / "adapter") == old_adapter  # byte for byte: the half-written new one is not in its place
    leftover = [name for name in hidden(out) if name.startswith(".adapter.")]
    assert len(leftover) == 1 and leftover[0].endswith(".tmp")

    # 3. resumed again: nothing to train, the final adapter is written from step 4 and the leftover is gone
    assert main(["train", str(cfg), "--resume"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"removed {leftover[0]}, left by an interrupted write of the final adapter" in said
    assert "resuming from step 4" in said
    assert adapter_weights(out / "adapter") == snapshot(out / "checkpoints" / "step-4" / "adapter")
    assert adapter_weights(out / "adapter") != old_adapter
    assert hidden(out) == [] and hidden(out / "checkpoints") == [] and hidden(tmp_path) == []


# ----------------------------------------------------------------------------- training: bad storage
def test_corrupted_checkpoints_are_detected_skipped_and_reported(tiny_model_dir, data_file, tmp_path, capsys):
    model_dir, out = tiny_model_dir("llama"), tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", model_dir, data_file, out)
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    first_adapter = snapshot(out / "adapter")
    marker = json.loads((out / "checkpoints" / "step-4" / COMPLETE_MARKER).read_text())
    assert set(marker["checksums"]) == set(marker["files"]) and "optimizer.pt" in marker["files"]

    # step 4: a truncated weight file; step 2: one flipped byte (same size, so only the sha256 can tell)
    weights = out / "checkpoints" / "step-4" / "adapter" / "adapter_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-10])
    optimizer = out / "checkpoints" / "step-2" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    assert checkpoint_problem(out / "checkpoints" / "step-4") == (
        f"adapter/adapter_model.safetensors has {size - 10} bytes where COMPLETE records {size}"
    )
    assert (
        checkpoint_problem(out / "checkpoints" / "step-2")
        == "the sha256 of optimizer.pt differs from the one COMPLETE records"
    )

    assert main(["train", str(cfg), "--resume"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert (
        f"skipped corrupted checkpoint step-4 (adapter/adapter_model.safetensors has {size - 10} bytes where "
        f"COMPLETE records {size}) and removed it"
    ) in said
    assert (
        "skipped corrupted checkpoint step-2 (the sha256 of optimizer.pt differs from the one COMPLETE records) and removed it"
        in said
    )
    assert f"found no complete checkpoint in {out / 'checkpoints'}, so training starts from step 0" in said
    assert "resuming from" not in said
    # it carried on: trained again from step 0, exactly as the first time (the CPU run is deterministic)
    assert [s for s, _ in checkpoint_dirs(out)] == [2, 4]
    assert all(checkpoint_problem(path) is None for _, path in checkpoint_dirs(out))
    assert snapshot(out / "adapter") == first_adapter


def test_disk_full_in_a_checkpoint_and_in_the_final_adapter_keeps_what_was_there(
    tiny_model_dir, data_file, tmp_path, capsys, monkeypatch
):
    model_dir, out = tiny_model_dir("llama"), tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", model_dir, data_file, out)

    monkeypatch.setenv(ENOSPC_ENV, "in-checkpoint:4")  # fails after step 4's files are written, before its marker
    assert main(["train", str(cfg)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        f"error: writing checkpoint step-4 in {out} failed ([Errno 28] No space left on device (injected at in-checkpoint:4)); "
        f"nothing partial was kept and the last complete checkpoint is {out / 'checkpoints' / 'step-2'}; "
        "free disk space or fix permissions, then run again with --resume."
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert checkpoint_problem(out / "checkpoints" / "step-2") is None  # every byte as its marker records
    assert not (out / "adapter").exists()

    monkeypatch.delenv(ENOSPC_ENV)
    assert main(["train", str(cfg), "--resume"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    done = snapshot(out / "adapter")
    assert adapter_weights(out / "adapter") == snapshot(out / "checkpoints" / "step-4" / "adapter")

    # a longer run on top fails while writing its final adapter: the previous adapter stays, byte for byte
    monkeypatch.setenv(ENOSPC_ENV, "in-final-adapter:6")
    assert main(["train", str(cfg), "--resume", "--train.max_steps", "6"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: writing the final adapter in {out} failed ([Errno 28] No space left on device")
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'step-6'}" in line
    assert snapshot(out / "adapter") == done
    assert hidden(out) == [] and hidden(tmp_path) == []  # the lock beside the run dir went with the process

    monkeypatch.delenv(ENOSPC_ENV)
    assert main(["train", str(cfg), "--resume", "--train.max_steps", "6"]) == 0
    assert "resuming from step 6" in capsys.readouterr().out
    assert adapter_weights(out / "adapter") == snapshot(out / "checkpoints" / "step-6" / "adapter")
    assert snapshot(out / "adapter") != done


# --------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """(base dir, adapter A, adapter B): two different non-zero adapters for the tiny Llama."""
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("fault-adapters")
    model, _ = load_quantized(base, device="cpu")
    apply_lora(model, r=4, alpha=8, seed=0)
    made = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
        made.append(save_adapter(model, root / f"adapter-{seed}"))
    return base, made[0], made[1]


def export_argv(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite", *extra]


def test_sigkill_and_disk_full_mid_export_keep_the_previous_output(adapters, tmp_path, capsys, monkeypatch):
    base, first, second = adapters
    out = tmp_path / "merged"
    assert main(export_argv(base, first, out)) == 0
    before = snapshot(out)
    assert len(SafetensorsFile(out / "model.safetensors").keys()) > 3

    # killed after 3 tensors of the new output were written
    killed = cli_subprocess(*export_argv(base, second, out), **{KILL_ENV: "in-export:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert snapshot(out) == before
    partial = [p for p in tmp_path.iterdir() if re.fullmatch(r"\.merged\.[a-z0-9_]{8}\.tmp", p.name)]
    assert len(partial) == 1 and not (partial[0] / "config.json").exists()  # never complete, never in place
    assert (tmp_path / ".merged.qlora-lite.lock").is_file()  # left by the dead process, but no longer locked

    # a disk that fills up after 2 tensors: an error naming the output, the old output untouched, nothing left over
    capsys.readouterr()
    monkeypatch.setenv(ENOSPC_ENV, "in-export:2")
    assert main(export_argv(base, second, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        f"error: writing the merged model to {out} failed ([Errno 28] No space left on device (injected at in-export:2)); "
        "nothing was changed there, free disk space or fix permissions and export again."
    )
    assert snapshot(out) == before
    assert hidden(tmp_path) == []  # the dead export's half-written dir and lock file were cleared under the lock

    monkeypatch.delenv(ENOSPC_ENV)
    assert main(export_argv(base, second, out)) == 0
    after = snapshot(out)
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]
    assert hidden(tmp_path) == []


def test_two_exports_to_one_output_dir_are_refused(adapters, tmp_path, capsys):
    base, first, _ = adapters
    out = tmp_path / "merged"
    with DirectoryLock(out, purpose="another export", beside=True):
        assert main(export_argv(base, first, out)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert re.fullmatch(
            rf"error: {re.escape(str(out))} is in use by pid {os.getpid()} \(another export\); "
            r"wait for it to finish or choose another output directory\.",
            line,
        ), line
        assert not out.exists()
    assert main(export_argv(base, first, out)) == 0  # free once the holder lets go
    assert hidden(tmp_path) == []


# ------------------------------------------------------------------------------------- out of memory
def test_out_of_memory_in_a_step_keeps_the_checkpoints_and_prints_the_fix(
    tiny_model_dir, data_file, tmp_path, capsys, monkeypatch
):
    model_dir, out = tiny_model_dir("llama"), tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", model_dir, data_file, out)
    settings = asdict(memory_settings(config_from_dict(yaml.safe_load(cfg.read_text()))))
    now = estimate_memory(model_dir, **settings)
    smaller = estimate_memory(model_dir, **{**settings, "batch_size": 1, "grad_accum": 2})
    assert smaller.total < now.total
    monkeypatch.setenv(GPU_MEMORY_ENV, f"{now.total - 1}B")  # one byte short of the prediction
    monkeypatch.setenv(OOM_ENV, "step:3")  # torch.OutOfMemoryError after step 3's backward

    assert main(["train", str(cfg)]) == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[0] == (
        f"error: training ran out of GPU memory (CUDA out of memory; tried to allocate 2.00 GiB); nothing from the "
        f"failed step was saved and the last complete checkpoint is {out / 'checkpoints' / 'step-2'}."
    )
    assert lines[1] == (
        f"memory: predicted peak {gib(now.total)} GiB for micro-batch 2 x 32 tokens, grad_accum 1, r=4, 4-bit nf4 "
        f"vs {gib(now.total - 1)} GiB on {now.total - 1}B: over by 0.00 GiB"
    )
    assert lines[2] == (
        f"fix: micro-batch 2 -> 1 with grad_accum 1 -> 2 (the same 2 sequences per optimizer step): "
        f"predicted {gib(smaller.total)} GiB, fits"
    )
    assert lines[3] == (
        "run: the same command with --train.micro_batch_size 1 --train.grad_accum 2 and a new output_dir "
        "(a checkpoint's data order depends on it)"
    )
    assert len(lines) == 4 and "Traceback" not in "".join(lines)
    # nothing of step 3 was saved, step 2 is intact, the metrics stop at step 2, and the lock was released
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert checkpoint_problem(out / "checkpoints" / "step-2") is None
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    DirectoryLock(out).acquire().release()

    monkeypatch.delenv(OOM_ENV)
    assert main(["train", str(cfg), "--resume"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert [s for s, _ in checkpoint_dirs(out)] == [2, 4]


def _advice(budget: str | None, **train):
    config = config_from_dict(
        {
            "model": "llama-3.1-8b",
            "data": {"train": "unused.jsonl", "max_seq_len": train.pop("seq", 2048)},
            "train": train,
        }
    )
    amount, label = parse_budget(budget) if budget else (None, None)
    return config, advise_after_oom(config, amount, label)


def _total(config, **changes) -> int:
    return estimate_memory("llama-3.1-8b", **{**asdict(memory_settings(config)), **changes}).total


def test_advice_is_the_largest_micro_batch_that_fits_at_the_same_effective_batch():
    config, advice = _advice("rtx-3060-12gb", micro_batch_size=16, grad_accum=2)
    budget = parse_budget("rtx-3060-12gb")[0]
    assert advice.total == _total(config) > budget
    change = advice.change
    b = change.overrides["train.micro_batch_size"]
    assert change.overrides == {"train.micro_batch_size": b, "train.grad_accum": 32 // b} and b < 16 and 32 % b == 0
    assert change.total == _total(config, batch_size=b, grad_accum=32 // b) <= budget
    larger = [d for d in range(b + 1, 16) if 32 % d == 0]  # the next larger micro-batch keeping 32 per step
    assert larger and all(_total(config, batch_size=d, grad_accum=32 // d) > budget for d in larger)
    assert change.fits and not change.resumable  # the micro-batch is part of a checkpoint's data order
    assert advice.lines()[-1].startswith(
        f"run: the same command with --train.micro_batch_size {b} --train.grad_accum {32 // b} "
    )


def test_advice_prefers_chunked_loss_and_falls_back_to_a_shorter_sequence():
    # chunked loss off: turning it on keeps the results and fits, so it comes first (and --resume accepts it)
    config, advice = _advice("rtx-3060-12gb", micro_batch_size=1, grad_accum=16, seq=4096, loss_chunk_tokens=0)
    assert advice.change.overrides == {"train.loss_chunk_tokens": config.train.__class__().loss_chunk_tokens}
    assert advice.change.fits and advice.change.resumable
    assert (
        advice.lines()[-1]
        == f"run: the same command with --resume --train.loss_chunk_tokens {config.train.__class__().loss_chunk_tokens}"
    )
    # micro-batch 1 and everything else already on: the longest sequence that fits
    config, advice = _advice("t4-16gb", micro_batch_size=1, grad_accum=1, seq=131072, offload_activations=True)
    budget = parse_budget("t4-16gb")[0]
    seq = advice.change.overrides["data.max_seq_len"]
    assert advice.change.overrides == {"data.max_seq_len": seq}
    assert _total(config, seq_len=seq) <= budget < _total(config, seq_len=seq + 1)


def test_advice_when_the_prediction_already_fits():
    config, advice = _advice("80GiB", micro_batch_size=4, grad_accum=4, seq=1024)
    assert advice.total < parse_budget("80GiB")[0]
    assert advice.note.startswith("the prediction is under the budget, yet the GPU ran out")
    assert "data.max_seq_len" not in advice.change.overrides  # no truncation to chase an estimate that fits
    assert advice.change.total < advice.total
    _, unknown = _advice(None, micro_batch_size=4, grad_accum=4, seq=1024)
    assert unknown.budget is None and unknown.lines()[0].endswith("(GPU memory unknown)")


# ---------------------------------------------------------------------------------------------- safety
def test_the_package_never_unpickles():
    """Every torch.load passes weights_only=True, and nothing imports pickle."""
    loads = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), (
                    f"{path}:{node.lineno}"
                )
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                safe = [
                    k
                    for k in node.keywords
                    if k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                ]
                assert safe, f"{path}:{node.lineno}: torch.load without weights_only=True"
                loads.append(f"{path.name}:{node.lineno}")
    assert loads  # the scan does see the checkpoint's optimizer load
