"""Data-parallel training under torchrun on the CPU (gloo, 2 ranks, one thread each).

2 ranks x micro-batch b x grad_accum a must give the adapter of 1 process x b x 2a bit for bit (the loss is
normalised by the target count of all ranks, and the fp32 master gradients are summed once per step); both ranks
must end with the same adapter; only rank 0 writes. A rank SIGKILLed mid-run stops the others with a message, and
`--resume` with the same number of ranks ends with the uninterrupted run's adapter. Two torchrun launchers joined
by a c10d rendezvous on 127.0.0.1 stand in for two nodes.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_lite.io.faults import KILL_ENV, KILL_RANK_ENV
from qlora_lite.training.checkpoint import checkpoint_dirs
from tests.helpers import torchrun

WORKER = str(Path(__file__).parent / "distributed" / "train_worker.py")
pytestmark = pytest.mark.slow


def _config(tmp: Path, model_dir: Path, data: Path, name: str, grad_accum: int, **train) -> Path:
    settings = {
        "model": str(model_dir),
        "output_dir": str(tmp / name),
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "max_seq_len": 32},
        "train": {
            "max_steps": 4, "micro_batch_size": 2, "grad_accum": grad_accum, "lr": 5e-3, "warmup_steps": 1,
            "optimizer": "adamw_8bit", "seed": 3, "log_every": 2, "eval_every": 2, "save_every": 2,
            "collective_timeout": 60, **train,
        },
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The one-process reference (b=2, a=4) and the 2-rank run (b=2, a=2) on the same data and seed."""
    from qlora_lite import train

    tmp = tmp_path_factory.mktemp("dp")
    recs = [{"prompt": f"item {i}: ", "completion": "x" * (1 + i % 5) + f" #{i}"} for i in range(40)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:36]))
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[36:]))
    model_dir = tiny_model_dir("llama")

    def config(name: str, grad_accum: int, **train) -> Path:
        return _config(tmp, model_dir, tmp, name, grad_accum, **train)

    train(config("one", 4), progress=False)
    two = torchrun([WORKER, str(config("two", 2))])
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, config


def test_two_ranks_equal_one_process_with_twice_the_accumulation(runs):
    tmp, _ = runs
    one, two = tmp / "one", tmp / "two"
    assert _same(_adapter(two), _adapter(one))  # bit for bit
    assert _same(load_file(str(two / "rank1.safetensors")), load_file(str(two / "rank0.safetensors")))
    saved = {k.removeprefix("base_model.model."): v for k, v in _adapter(two).items()}  # PEFT's key prefix
    assert _same(load_file(str(two / "rank0.safetensors")), saved)
    # metrics written once (rank 0), with the same steps, token counts and losses as one process
    ref, got = _rows(one), _rows(two)
    assert [(r["step"], r.get("tokens"), "eval_loss" in r) for r in got] == [
        (r["step"], r.get("tokens"), "eval_loss" in r) for r in ref
    ]
    for r, g in zip(ref, got):
        key = "eval_loss" if "eval_loss" in r else "loss"
        assert g[key] == pytest.approx(r[key], rel=1e-6)  # the loss is summed over ranks in another order
    state = json.loads((two / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["world"] == {"size": 2}
    assert state["fingerprint"]["train.fsdp"] is False


def test_a_killed_rank_stops_the_other_and_resume_ends_like_the_uninterrupted_run(runs):
    tmp, config = runs
    cfg = config("killed", 2)
    started = time.monotonic()
    killed = torchrun(["-m", "qlora_lite", "train", str(cfg)], env={KILL_ENV: "after-checkpoint:2", KILL_RANK_ENV: "1"})
    assert killed.returncode != 0
    assert time.monotonic() - started < 60  # not a hang until the collective timeout
    survivor = [line for line in killed.stderr.splitlines() if "rank 0 of 2" in line]
    # torchrun's SIGTERM (rank 0 may still be finishing step 2), or gloo's report of the dead peer in step 3
    assert survivor, killed.stderr[-3000:]
    assert re.search(r"interrupted at step [23] on rank 0 of 2 \(when one rank fails, torchrun stops", survivor[0]) or (
        "step 3: rank 0 of 2 lost the other ranks during step 3's gradient sum" in survivor[0]
    ), survivor[0]
    assert f"the last complete checkpoint is {tmp / 'killed' / 'checkpoints' / 'step-2'}" in survivor[0]
    assert "Traceback" not in killed.stdout
    assert [s for s, _ in checkpoint_dirs(tmp / "killed")] == [2]

    # resuming with another number of ranks is refused in one sentence
    one = subprocess.run(
        [sys.executable, "-m", "qlora_lite", "train", str(cfg), "--resume"], capture_output=True, text=True, timeout=120
    )
    assert one.returncode == 2
    assert one.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp / 'killed' / 'checkpoints' / 'step-2'} was written by 2 ranks but this run has one "
        "process; resume with the same number of ranks (torchrun --nproc_per_node x --nnodes = 2) or start a new "
        "output_dir."
    ]

    resumed = torchrun([WORKER, str(cfg), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same(_adapter(tmp / "killed"), _adapter(tmp / "two"))
    assert [r["step"] for r in _rows(tmp / "killed")] == [r["step"] for r in _rows(tmp / "two")]


def test_two_nodes_through_a_c10d_rendezvous_equal_one_process(runs):
    tmp, config = runs
    cfg = config("nodes", 2)
    port = _free_port()
    rendezvous = [
        "--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=qlora-lite-test",
        "--local_addr=127.0.0.1",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    import os

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", *rendezvous, WORKER, str(cfg)]
    nodes = [subprocess.Popen(launch, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    nodes.append(subprocess.Popen(launch, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [o[1][-2000:] for o in outputs]
    assert _same(_adapter(tmp / "nodes"), _adapter(tmp / "one"))
    rows = _rows(tmp / "nodes")
    assert len(rows) == len(_rows(tmp / "one"))


def test_sharded_fsdp_run_killed_and_resumed_equals_one_process(runs):
    from qlora_lite import train

    tmp, config = runs
    # torch AdamW is elementwise: FSDP's update of each shard equals the one process's update of its flat buffer bit
    # for bit (8-bit state does not: bitsandbytes' 256-value blocks follow the layout, per shard or over the buffer)
    train(config("one-adamw", 4, optimizer="adamw"), progress=False)
    cfg = config("fsdp", 2, fsdp=True, optimizer="adamw")
    killed = torchrun(["-m", "qlora_lite", "train", str(cfg)], env={KILL_ENV: "after-checkpoint:2", KILL_RANK_ENV: "1"})
    assert killed.returncode != 0
    assert "2 ranks, base and adapters sharded over the GPUs of each node (FSDP2)" in killed.stdout
    survivor = [line for line in killed.stderr.splitlines() if "rank 0 of 2" in line]
    assert survivor and "the last complete checkpoint is" in survivor[0], killed.stderr[-3000:]
    assert "Traceback" not in "".join(line for line in killed.stderr.splitlines() if line.startswith("[rank0]"))
    saved = torch.load(tmp / "fsdp" / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)
    assert len(saved["ranks"]) == 2  # each rank's shard of the masters and the optimizer state

    resumed = torchrun([WORKER, str(cfg), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # sharded training, a kill and a resume: still the one-process adapter, bit for bit on the CPU
    assert _same(_adapter(tmp / "fsdp"), _adapter(tmp / "one-adamw"))
    assert _same(load_file(str(tmp / "fsdp" / "rank1.safetensors")), load_file(str(tmp / "fsdp" / "rank0.safetensors")))
    assert [r["step"] for r in _rows(tmp / "fsdp")] == [r["step"] for r in _rows(tmp / "one-adamw")]
