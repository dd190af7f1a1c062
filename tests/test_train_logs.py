"""What a batch job's log shows: plain lines every log_every steps when stdout is not a terminal."""

from __future__ import annotations

import json
import re

import yaml

from qlora_lite.cli.main import main


def test_plain_log_lines_when_stdout_is_not_a_terminal(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i} =", "completion": f" a{i}"}) + "\n" for i in range(16)))
    config = {
        "model": str(tiny_model_dir("llama")), "output_dir": str(tmp_path / "run"),
        "lora": {"r": 4, "alpha": 8}, "data": {"train": str(data), "max_seq_len": 32},
        "train": {"max_steps": 7, "micro_batch_size": 2, "grad_accum": 1, "optimizer": "adamw", "log_every": 3,
                  "eval_every": 0, "save_every": 0},
    }  # fmt: skip
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"^step (\d+)/7 loss ([0-9.]+) lr ([0-9.e+-]+) ([0-9.]+K?) tok/s$", out, flags=re.M)
    assert [int(step) for step, *_ in lines] == [3, 6, 7]  # every log_every steps and the last
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the printed loss is the window's mean, the same number metrics.jsonl records
    assert [f"{r['loss']:.4f}" for r in logged] == [loss for _, loss, _, _ in lines]
    assert "\r" not in out and "━" not in out  # no progress-bar redraws in a log file
