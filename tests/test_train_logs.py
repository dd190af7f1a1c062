"""What a run shows: plain lines every log_every steps when stdout is not a terminal (from `Reporter.on_log`,
with the window's mean loss and tokens/s), and from Python the CLI's display on a terminal only."""

from __future__ import annotations

import io
import json
import re
import types

import pytest
import yaml
from rich.console import Console

from qlora_lite.cli import main
from qlora_lite.config.load import config_from_dict
from qlora_lite.training import loop, progress, run
from qlora_lite.training.reporter import Reporter


class StepClock:
    """`time.perf_counter` for the loop: step k takes k seconds (the run's first call starts the clock; each step
    reads it before and after), so steps of different lengths tell a window's average from a mean of rates."""

    def __init__(self):
        self.calls, self.now = 0, 0.0

    def perf_counter(self) -> float:
        self.calls += 1
        if self.calls > 1 and self.calls % 2 == 1:  # the reading after step (calls - 1) / 2
            self.now += (self.calls - 1) / 2
        return self.now


@pytest.fixture
def step_clock(monkeypatch) -> StepClock:
    clock = StepClock()
    monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    return clock


def _settings(model_dir, data, out, **train) -> dict:
    settings = dict(max_steps=7, micro_batch_size=2, grad_accum=1, optimizer="adamw", log_every=3, eval_every=0,
                    save_every=0)  # fmt: skip
    settings.update(train)
    return {"model": str(model_dir), "output_dir": str(out), "lora": {"r": 4, "alpha": 8},
            "data": {"train": str(data), "max_seq_len": 32}, "train": settings}  # fmt: skip


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    # completions of different lengths, so the steps' token counts differ
    path.write_text(
        "".join(json.dumps({"prompt": f"q{i} =", "completion": " a" * (1 + i % 5)}) + "\n" for i in range(16))
    )
    return path


def _window_averages(rows: list[dict]) -> list[float]:
    """tokens/s of each logged window under StepClock: its tokens (from the running total) over 1 + 2 + ... s."""
    out, tokens_before, step_before = [], 0, 0
    for r in rows:
        seconds = sum(range(step_before + 1, r["step"] + 1))
        out.append(round((r["tokens"] - tokens_before) / seconds, 1))
        tokens_before, step_before = r["tokens"], r["step"]
    return out


def test_plain_log_lines_when_stdout_is_not_a_terminal(tiny_model_dir, tmp_path, capsys, data, step_clock):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_settings(tiny_model_dir("llama"), data, tmp_path / "run")))
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"^step (\d+)/7 loss ([0-9.]+) lr ([0-9.e+-]+) ([0-9.]+K?) tok/s$", out, flags=re.M)
    assert [int(step) for step, *_ in lines] == [3, 6, 7]  # every log_every steps and the last
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the printed numbers are the ones metrics.jsonl records: the window's mean loss, its tokens over its seconds
    assert [f"{r['loss']:.4f}" for r in logged] == [loss for _, loss, _, _ in lines]
    assert [f"{r['lr']:.2e}" for r in logged] == [lr for _, _, lr, _ in lines]
    assert [f"{r['tokens_per_s']:.0f}" for r in logged] == [speed for *_, speed in lines]
    assert [r["tokens_per_s"] for r in logged] == _window_averages(logged)
    assert "\r" not in out and "━" not in out  # no progress-bar redraws in a log file
    assert "7 steps of 2 sequences (0.875 epochs)" in out  # the run's length at the start


class Recorder(Reporter):
    def __init__(self):
        self.steps: list[dict] = []
        self.logs: list[dict] = []

    def on_step(self, record: dict) -> None:
        self.steps.append(record)

    def on_log(self, record: dict) -> None:
        self.logs.append(record)


def test_on_log_gets_the_metrics_rows_and_tokens_per_s_is_the_window_average(
    tiny_model_dir, tmp_path, data, step_clock
):
    out = tmp_path / "run"
    recorder = Recorder()
    result = loop.train(config_from_dict(_settings(tiny_model_dir("llama"), data, out)), reporter=recorder)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recorder.logs == rows and [r["step"] for r in rows] == [3, 6, 7]
    # each step's own rate is its tokens over k seconds; a window's is the sum of tokens over the sum of seconds
    per_step_tokens = [round(r["tokens_per_s"] * r["step"]) for r in recorder.steps]
    assert sum(per_step_tokens) == result.tokens == rows[-1]["tokens"]
    assert [r["tokens_per_s"] for r in rows] == _window_averages(rows)
    first_window = recorder.steps[:3]
    mean_of_rates = sum(r["tokens_per_s"] for r in first_window) / 3
    assert abs(mean_of_rates - rows[0]["tokens_per_s"]) > 1.0  # what the old per-step mean would have printed
    assert rows[0]["tokens_per_s"] == pytest.approx(sum(per_step_tokens[:3]) / 6, abs=0.05)


def _terminal(monkeypatch) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(
        progress,
        "progress_console",
        lambda: Console(file=buffer, force_terminal=True, width=150, highlight=False, color_system=None),
    )
    return buffer


def test_train_from_python_shows_progress_on_a_terminal_only(tiny_model_dir, tmp_path, data, monkeypatch, capsys):
    settings = _settings(tiny_model_dir("llama"), data, tmp_path / "shown", max_steps=3)
    buffer = _terminal(monkeypatch)
    loop.train(config_from_dict(settings))
    shown = buffer.getvalue()
    assert "train: 9,728 trainable of 149,312 parameters on cpu, optimizer adamw" in shown
    assert "3 steps of 2 sequences (0.375 epochs)" in shown
    assert re.search(r"step 3/3 loss \d\.\d{4} lr", shown)  # the bar at its end
    assert capsys.readouterr().out == ""  # only the console it was given

    buffer = _terminal(monkeypatch)
    loop.train(config_from_dict({**settings, "output_dir": str(tmp_path / "off")}), progress=False)
    assert buffer.getvalue() == ""

    monkeypatch.undo()  # stdout is pytest's capture, not a terminal: nothing is shown
    loop.train(config_from_dict({**settings, "output_dir": str(tmp_path / "quiet")}))
    assert capsys.readouterr().out == ""


def test_progress_must_be_true_or_false(tmp_path):
    from qlora_lite.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^progress must be True or False, got 'no'\.$"):
        loop.train(str(tmp_path / "run.yaml"), progress="no")
