"""train.report_to: metrics.csv mirrors metrics.jsonl, TensorBoard gets the logged losses, a missing package or an
unknown name is one line (exit 2) before the model loads."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from qlora_lite.cli import main
from qlora_lite.config.load import config_from_dict
from qlora_lite.training import loop, run
from qlora_lite.training.interrupt import Interrupted
from qlora_lite.training.reporter import Reporter

RECORDS = [{"prompt": f"item {i}: ", "completion": "x" * (1 + i % 5) + f" #{i}"} for i in range(20)]


@pytest.fixture
def data(tmp_path) -> tuple[Path, Path]:
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:16]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[16:]))
    return train, evals


def _settings(model_dir, data: tuple[Path, Path], out: Path, report_to: list[str], **train) -> dict:
    settings = dict(
        max_steps=5, micro_batch_size=2, grad_accum=1, warmup_steps=1, optimizer="adamw", log_every=2, eval_every=2,
        save_every=2, report_to=report_to,
    )  # fmt: skip
    settings.update(train)
    return {"model": str(model_dir), "output_dir": str(out), "lora": {"r": 4, "alpha": 8},
            "data": {"train": str(data[0]), "eval": str(data[1]), "max_seq_len": 32}, "train": settings}  # fmt: skip


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _csv_as_jsonl(out: Path) -> list[dict]:
    """metrics.csv's rows with their empty cells left out and each value as JSON would read it."""
    with open(out / "metrics.csv", newline="") as f:
        return [{k: json.loads(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


class StopAt(Reporter):
    def __init__(self, step: int):
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def test_csv_rows_equal_the_metrics_jsonl_rows_also_across_a_resume(tiny_model_dir, tmp_path, data):
    out = tmp_path / "run"
    config = config_from_dict(_settings(tiny_model_dir("llama"), data, out, ["csv"]))
    loop.train(config)
    rows = _jsonl(out)
    assert [(r["step"], "loss" in r) for r in rows] == [(2, True), (2, False), (4, True), (4, False), (5, True),
                                                        (5, False)]  # fmt: skip
    assert _csv_as_jsonl(out) == rows
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,loss,lr,grad_norm,tokens,epoch,tokens_per_s,eval_loss,eval_ppl"

    cut = tmp_path / "cut"
    config = config_from_dict(_settings(tiny_model_dir("llama"), data, cut, ["csv"]))
    with pytest.raises(Interrupted):
        loop.train(config, reporter=StopAt(4))
    assert [r["step"] for r in _csv_as_jsonl(cut)] == [2, 2, 4, 4]
    loop.train(config, resume=True)
    assert _csv_as_jsonl(cut) == _jsonl(cut) and [r["step"] for r in _jsonl(cut)] == [2, 2, 4, 4, 5, 5]


def test_tensorboard_event_file_holds_the_logged_losses(tiny_model_dir, tmp_path, data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    loop.train(config_from_dict(_settings(tiny_model_dir("llama"), data, out, ["tensorboard", "csv"])))
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    rows = _jsonl(out)
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss"), ("train/tokens_per_s", "tokens_per_s")):
        scalars = events.Scalars(tag)
        expected = [r for r in rows if key in r and (key != "tokens_per_s" or "loss" in r)]
        assert [e.step for e in scalars] == [r["step"] for r in expected], tag
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in expected], rel=1e-6), tag  # float32


def _never_load(*args, **kwargs):
    raise AssertionError("the model was prepared before the trackers were checked")


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tiny_model_dir, tmp_path, data, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "wandb" else real_find_spec(name, *a, **k)
    )
    monkeypatch.setattr(run, "prepare_run", _never_load)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_settings(tiny_model_dir("llama"), data, tmp_path / "run", ["csv", "wandb"])))
    assert main(["train", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "error: train.report_to asks for wandb, but the wandb package is not installed; install it with "
        '`pip install "qlora-lite[wandb]"` or remove wandb from train.report_to.\n'
    )
    assert captured.out == "" and not (tmp_path / "run").exists()

    assert main(["train", str(cfg), "--train.report_to", "mlflow"]) == 2
    assert capsys.readouterr().err == "error: train.report_to names 'mlflow'; use any of tensorboard, wandb, csv.\n"
