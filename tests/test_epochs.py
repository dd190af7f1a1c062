"""train.epochs: the steps it makes, shown at the start and used for the schedule, checkpoints and an exact
resume; a warmup longer than the run, clipped and said; the loss-carrying tokens counted across resumes."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from qlora_lite.cli import main
from qlora_lite.config.load import config_from_dict
from qlora_lite.config.settings import TrainSettings
from qlora_lite.data.batching import IGNORE_INDEX, BatchOrder
from qlora_lite.data.encode import prepare_data
from qlora_lite.errors import ConfigError
from qlora_lite.io.atomic import file_sha256
from qlora_lite.io.safetensors import SafetensorsFile
from qlora_lite.model.loader import load_tokenizer_from
from qlora_lite.training.interrupt import Interrupted
from qlora_lite.training.loop import train
from qlora_lite.training.progress import summary_table
from qlora_lite.training.reporter import Reporter
from qlora_lite.training.schedule import lr_at, run_steps, warmup_notice


# ------------------------------------------------------------------------------------------- the step count
@pytest.mark.parametrize(("n", "size", "accum", "epochs"), [
    (18, 4, 2, 1.5), (18, 4, 2, 2.0), (16, 4, 1, 1.0), (50, 4, 4, 2.0), (7, 3, 5, 0.5), (10, 16, 1, 3.0),
])  # fmt: skip
def test_epochs_make_the_steps_that_cover_them_in_the_batch_order(n, size, accum, epochs):
    s = TrainSettings(epochs=epochs, micro_batch_size=size, grad_accum=accum)
    order = BatchOrder(n, size, seed=0)
    steps = run_steps(s, order.batches_per_epoch)
    for _ in range((steps - 1) * accum):
        order.next_indices()
    assert order.epochs_done < epochs  # one step fewer would not cover the epochs
    for _ in range(accum):
        order.next_indices()
    assert order.epochs_done >= epochs


def test_step_count_examples_and_decimal_epochs():
    s = TrainSettings(epochs=2.0, micro_batch_size=4, grad_accum=4)
    assert run_steps(s, math.ceil(50 / 4)) == 7  # 13 micro-batches an epoch, 26 in all: 6.5 steps -> 7
    assert run_steps(TrainSettings(max_steps=9, epochs=0.0), 13) == 9
    assert math.ceil(1.1 * 50) == 56  # binary floating point would ask for one step more than 55 micro-batches
    assert run_steps(TrainSettings(epochs=1.1, grad_accum=1), 50) == 55
    assert run_steps(TrainSettings(epochs=0.01, grad_accum=8), 5) == 1  # never fewer than one step


def test_a_warmup_longer_than_the_run_is_clipped_and_said():
    s = TrainSettings(epochs=1.0, warmup_steps=10, lr=1.0)
    assert [lr_at(k, s, 4) for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]  # train.lr reached at the last step
    assert warmup_notice(s, 4) == [
        "train.warmup_steps is 10 but the run has 4 steps, so the learning rate would never reach train.lr; the "
        "warmup is clipped to the run's 4 steps, reaching train.lr at the last; set train.warmup_steps below 4 for "
        "steps at the full learning rate"
    ]
    assert warmup_notice(s, 10) == [] and lr_at(10, s, 10) == 1.0  # a warmup as long as the run reaches lr
    assert warmup_notice(s, 11) == [] and lr_at(11, s, 11) == 1.0  # first step after the warmup at full lr


# ------------------------------------------------------------------------------------------- runs
RECORDS = [{"prompt": f"item {i}: ", "completion": "x" * (1 + i % 5) + f" #{i}"} for i in range(18)]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def _settings(model_dir, data: Path, out: Path, **train_settings) -> dict:
    settings = dict(
        epochs=1.5, micro_batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=1, optimizer="adamw", log_every=3,
        eval_every=0, save_every=1, keep_checkpoints=10, seed=5,
    )  # fmt: skip
    settings.update(train_settings)
    return {"model": str(model_dir), "output_dir": str(out), "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "data": {"train": str(data), "max_seq_len": 32}, "train": settings}  # fmt: skip


class Recorder(Reporter):
    def __init__(self, stop_after_checkpoint: int | None = None):
        self.info: dict = {}
        self.stop = stop_after_checkpoint

    def on_start(self, info: dict) -> None:
        self.info = info

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.stop:
            raise KeyboardInterrupt


def _rows(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in map(json.loads, (out / "metrics.jsonl").open())]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    st = SafetensorsFile(path / "adapter_model.safetensors")
    return {k: st.read(k) for k in st.keys()}


def _state(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())


def test_epochs_run_shows_its_steps_and_counts_the_tokens_that_carried_loss(tiny_model_dir, tmp_path, data, capsys):
    model_dir = tiny_model_dir("llama")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_settings(model_dir, data, tmp_path / "cli", save_every=0)))
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    # 18 sequences in micro-batches of 4: 5 an epoch, 7.5 for 1.5 epochs, 3.75 steps of 2
    assert "\n1.5 epochs = 4 steps of 8 sequences\n" in out
    assert re.findall(r"^step (\d+)/4 ", out, flags=re.M) == ["3", "4"]
    last = json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == pytest.approx(1 + 12 / 18, abs=1e-4)  # 8 micro-batches: 1 epoch and 3 of 5 batches

    # one whole epoch, counted from the data independently of the loop
    config = config_from_dict(_settings(model_dir, data, tmp_path / "one", epochs=1.0, save_every=0))
    recorder = Recorder()
    result = train(config, reporter=recorder)
    assert (recorder.info["max_steps"], recorder.info["epochs"], result.steps) == (3, 1.0, 3)  # 5 micro-batches / 2
    assert recorder.info["micro_batches_per_epoch"] == 5 and recorder.info["sequences_per_step"] == 8
    examples = prepare_data(config.data, load_tokenizer_from(model_dir), config.train.seed)[0].examples
    epoch_targets = sum(sum(lab != IGNORE_INDEX for lab in e.labels[1:]) for e in examples)
    # 3 steps of 2 micro-batches: the epoch's 5 and the next epoch's first (4 sequences of its order)
    order = BatchOrder(len(examples), 4, config.train.seed, epoch=1)
    extra = order.next_indices()
    assert result.target_tokens == epoch_targets + sum(
        sum(lab != IGNORE_INDEX for lab in examples[i].labels[1:]) for i in extra
    )
    assert result.tokens == sum(len(e) for e in examples) + sum(len(examples[i]) for i in extra)
    assert 0 < result.target_tokens < result.tokens
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(summary_table(result))
    table = console.file.getvalue()
    assert re.search(rf"│ tokens trained +│ {result.tokens:,} +│", table)
    assert re.search(rf"│ tokens with loss +│ {result.target_tokens:,} +│", table)


def test_resume_with_epochs_is_exact_and_keeps_counting_loss_tokens(tiny_model_dir, tmp_path, data):
    model_dir = tiny_model_dir("llama")
    whole = train(config_from_dict(_settings(model_dir, data, tmp_path / "whole")))
    assert whole.steps == 4 and _state(tmp_path / "whole", 4)["schedule"]["max_steps"] == 4

    config = config_from_dict(_settings(model_dir, data, tmp_path / "cut"))
    with pytest.raises(Interrupted):
        train(config, reporter=Recorder(stop_after_checkpoint=2))
    at_two = _state(tmp_path / "cut", 2)["target_tokens"]
    assert 0 < at_two < whole.target_tokens
    resumed = train(config, resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == 4 and resumed.notices == []
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")  # same losses, learning rates and norms
    left, right = _adapter(tmp_path / "whole" / "adapter"), _adapter(tmp_path / "cut" / "adapter")
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    assert (resumed.target_tokens, resumed.tokens) == (whole.target_tokens, whole.tokens)


def _drop_from_trainer_state(checkpoint: Path, key: str) -> None:
    """Rewrite trainer_state.json as an earlier qlora-lite wrote it (without `key`), its marker updated to match."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    del state[key]
    path.write_text(json.dumps(state))
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["checksums"]["trainer_state.json"] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


def test_an_older_checkpoint_without_the_loss_token_count_counts_from_the_resume_point(tiny_model_dir, tmp_path, data):
    config = config_from_dict(_settings(tiny_model_dir("llama"), data, tmp_path / "run"))
    with pytest.raises(Interrupted):
        train(config, reporter=Recorder(stop_after_checkpoint=2))
    at_two = _state(tmp_path / "run", 2)["target_tokens"]
    _drop_from_trainer_state(tmp_path / "run" / "checkpoints" / "step-2", "target_tokens")
    resumed = train(config, resume=True)
    assert resumed.notices == []  # nothing said
    at_four = _state(tmp_path / "run", 4)["target_tokens"]
    assert resumed.target_tokens == at_four > 0
    whole = train(config_from_dict(_settings(tiny_model_dir("llama"), data, tmp_path / "whole")))
    assert resumed.target_tokens == whole.target_tokens - at_two  # steps 3 and 4 only


def test_changing_epochs_on_resume_is_said_and_too_few_is_refused(tiny_model_dir, tmp_path, data):
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "run"
    train(config_from_dict(_settings(model_dir, data, out)))  # 4 steps
    longer = config_from_dict(_settings(model_dir, data, out, epochs=2.5))  # 12.5 micro-batches: 7 steps
    result = train(longer, resume=True)
    assert result.steps == 7 and result.resumed_from == 4
    assert result.notices == [
        "the run's length (train.epochs = 2.5) changed from 4 to 7 steps: the cosine schedule now decays over 7 "
        "steps, so the learning rate from step 5 on differs from the first run's"
    ]
    shorter = config_from_dict(_settings(model_dir, data, out, epochs=1.0))  # 3 steps, the checkpoint is at 7
    with pytest.raises(ConfigError) as info:
        train(shorter, resume=True)
    assert str(info.value) == (
        f"train.epochs = 1.0 makes a run of 3 steps but checkpoint {out / 'checkpoints' / 'step-7'} is at step 7; set "
        "train.epochs to 2.8 or more, or take the adapter of an earlier checkpoint."
    )
