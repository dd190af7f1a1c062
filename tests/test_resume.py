"""Exact resume: a run SIGKILLed after step 6, and again in the middle of writing step 9's checkpoint, then resumed,
ends with the same adapter weights (bit for bit on the CPU) and the same logged losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from qlora_lite.io.faults import KILL_ENV
from qlora_lite.io.safetensors import SafetensorsFile
from qlora_lite.training.checkpoint import COMPLETE_MARKER, checkpoint_dirs, latest_checkpoint


def _settings(model_dir, data_dir, out) -> dict:
    return {
        "model": str(model_dir),
        "output_dir": str(out),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state must be restored too
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "max_seq_len": 32},
        "train": {
            "max_steps": 12,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 5e-3,
            "warmup_steps": 2,
            "schedule": "cosine",
            "optimizer": "adamw_8bit",
            "seed": 7,
            "log_every": 4,
            "eval_every": 4,
            "save_every": 3,
            "keep_checkpoints": 2,
        },
    }


def _run(cfg_path, *extra, kill: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    env.pop(KILL_ENV, None)
    if kill:
        env[KILL_ENV] = kill
    return subprocess.run(
        [sys.executable, "-m", "qlora_lite", "train", str(cfg_path), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _metrics(out) -> list[dict]:
    keep = ("step", "loss", "lr", "grad_norm", "eval_loss")
    return [
        {k: r[k] for k in keep if k in r} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


def _adapter(path) -> dict[str, torch.Tensor]:
    st = SafetensorsFile(path / "adapter_model.safetensors")
    return {k: st.read(k) for k in st.keys()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-data")
    recs = [
        {"prompt": f"item {i}: ", "completion": "x" * (1 + i % 5) + f" #{i}"} for i in range(20)
    ]  # 5 steps per epoch
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:18]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[18:]))
    return root


@pytest.mark.slow
def test_sigkill_and_resume_end_exactly_like_an_uninterrupted_run(tiny_model_dir, data_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    ref_cfg, cfg = tmp_path / "ref.yaml", tmp_path / "run.yaml"
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    ref_cfg.write_text(yaml.safe_dump(_settings(model_dir, data_dir, ref_out)))
    cfg.write_text(yaml.safe_dump(_settings(model_dir, data_dir, out)))

    ref = _run(ref_cfg)
    assert ref.returncode == 0, ref.stderr

    # 1. killed right after step 6's checkpoint is complete
    killed = _run(cfg, kill="after-checkpoint:6")
    assert killed.returncode == -signal.SIGKILL
    assert [s for s, _ in checkpoint_dirs(out)] == [3, 6]
    assert not (out / "adapter").exists()

    # 2. resumed, and killed again in the middle of writing step 9's checkpoint
    killed = _run(cfg, "--resume", kill="in-checkpoint:9")
    assert killed.returncode == -signal.SIGKILL
    assert "resuming from step 6" in killed.stdout
    half = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-9.")]
    assert len(half) == 1 and (half[0] / "optimizer.pt").is_file() and not (half[0] / COMPLETE_MARKER).exists()
    assert latest_checkpoint(out).name == "step-6"
    # A step dir without its completion marker (e.g. copied by hand, or from a non-atomic file system) and a torn
    # metrics line (a kill in the middle of an append) must not be picked up either.
    (out / "checkpoints" / "step-11").mkdir()
    (out / "checkpoints" / "step-11" / "trainer_state.json").write_text('{"step": 11}')
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')
    assert latest_checkpoint(out).name == "step-6"

    # 3. resumed to the end
    done = _run(cfg, "--resume")
    assert done.returncode == 0, done.stderr
    assert "resuming from step 6" in done.stdout
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert [s for s, _ in checkpoint_dirs(out)] == [9, 12]

    assert _metrics(out) == _metrics(ref_out)
    assert [r["step"] for r in _metrics(ref_out) if "loss" in r] == [4, 8, 12]
    ref_adapter, adapter = _adapter(ref_out / "adapter"), _adapter(out / "adapter")
    assert ref_adapter.keys() == adapter.keys() and len(adapter) == 2 * 7 * 2
    for name, tensor in ref_adapter.items():
        assert torch.equal(adapter[name], tensor), name
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # training did move the adapters
    ref_opt = torch.load(ref_out / "checkpoints" / "step-12" / "optimizer.pt", weights_only=True)
    opt = torch.load(out / "checkpoints" / "step-12" / "optimizer.pt", weights_only=True)
    for a, b in zip(ref_opt["masters"], opt["masters"]):
        assert torch.equal(a, b)
