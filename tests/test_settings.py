"""The one settings schema: every run setting defined once, read the same way by `train`, `qlora-lite memory`,
the out-of-memory advice and the example script."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from qlora_lite.cli import main
from qlora_lite.config.load import config_with_overrides, load_config
from qlora_lite.config.settings import TrainConfig, default_of, resume_keys, valid_keys
from qlora_lite.errors import ConfigError
from qlora_lite.memory.oom import advise_after_oom
from qlora_lite.memory.settings import SCHEMA_KEYS, RunSettings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "qlora_instruct.yaml"
PRESET = "qwen2.5-1.5b"


def memory_cli_total(capsys, *argv: str) -> int:
    assert main(["memory", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["total"]


def test_the_three_predictions_agree_on_the_shipped_example(capsys, monkeypatch):
    """`qlora-lite memory run.yaml`, the out-of-memory advice and the example's pre-flight give one number."""
    from_cli = memory_cli_total(capsys, str(EXAMPLE), "--model", PRESET)
    config = load_config(EXAMPLE, {"model": PRESET})
    from_oom = advise_after_oom(config, budget=None).total
    example = runpy.run_path(str(EXAMPLES / "finetune_local.py"), run_name="example")
    from rich.console import Console

    example["memory_check"](config, Console(width=200, highlight=False), force=True)
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if "predicted peak" in line)
    from_example = float(line.split("predicted peak")[1].split("GiB")[0])
    assert from_cli == from_oom
    assert from_example == pytest.approx(from_cli / 2**30, abs=0.005)  # printed with 2 decimals
    # and the example's settings really are the YAML's (micro-batch 4, dropout 0.05), not the bare defaults
    bare = memory_cli_total(capsys, PRESET, "--lora-dropout", "0")
    assert bare != from_cli


def test_memory_defaults_are_the_trainers(capsys):
    """A preset with no flags is estimated at the trainer's micro-batch, accumulation, sequence length and rank."""
    settings = RunSettings()
    for field, key in SCHEMA_KEYS.items():
        assert getattr(settings, field) == default_of(key), field
    assert (settings.batch_size, settings.grad_accum, settings.seq_len) == (4, 4, 1024)
    plain = memory_cli_total(capsys, PRESET)
    explicit = memory_cli_total(
        capsys, PRESET, "--batch-size", "4", "--grad-accum", "4", "--seq-len", "1024", "--rank", "16"
    )
    assert plain == explicit
    assert memory_cli_total(capsys, PRESET, "--batch-size", "1") < plain


def test_memory_takes_section_key_overrides_like_train(capsys):
    flag = memory_cli_total(capsys, PRESET, "--rank", "64")
    override = memory_cli_total(capsys, PRESET, "--lora.r", "64")
    assert flag == override != memory_cli_total(capsys, PRESET)


def test_resume_keys_come_from_the_schema():
    keys = resume_keys()
    assert {"model", "quant.bits", "lora.r", "lora.target_modules", "data.max_seq_len", "train.micro_batch_size",
            "train.grad_accum", "train.seed"} <= set(keys)  # fmt: skip
    assert not {"train.max_steps", "train.lr", "train.save_every", "output_dir"} & set(keys)
    assert set(keys) <= set(valid_keys())


@pytest.mark.parametrize("text", ["[q_proj, v_proj]", "q_proj,v_proj", " q_proj , v_proj "])
def test_a_list_override_is_a_list_not_a_regex(text):
    config = config_with_overrides({"model": "m", "lora.target_modules": text}, for_training=False)
    assert config.lora.target_modules == ["q_proj", "v_proj"]


def test_a_regex_override_stays_a_regex():
    config = config_with_overrides({"model": "m", "lora.target_modules": r".*\.(q|v)_proj"}, for_training=False)
    assert config.lora.target_modules == r".*\.(q|v)_proj"


def test_an_unknown_key_suggests_the_closest_first():
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.rank' \(did you mean 'lora.r'\?\)"):
        config_with_overrides({"lora.rank": "8"})
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'train.learning_rat' \(did you mean 'train.lr'\?\)|"
        r"did you mean",
    ):
        config_with_overrides({"train.learning_rat": "1e-4"})


def test_a_key_written_twice_in_yaml_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: {train: t.jsonl}\nlora:\n  r: 8\nlora:\n  r: 16\n")
    with pytest.raises(ConfigError, match=r"line 5 .*'lora' appears twice"):
        load_config(path)


def test_validation_names_every_problem_at_once():
    config = TrainConfig(model="m")
    config.data.train = "t.jsonl"
    config.lora.r = 0
    config.train.lr = float("nan")
    config.train.max_grad_norm = -1.0
    with pytest.raises(ConfigError) as err:
        config.validate()
    text = str(err.value)
    assert "lora.r is 0" in text and "train.lr is nan" in text and "train.max_grad_norm is -1.0" in text


def test_lora_alpha_zero_is_refused():
    with pytest.raises(ConfigError, match="lora.alpha is 0"):
        config_with_overrides({"model": "m", "data.train": "t", "lora.alpha": "0"})


@pytest.mark.parametrize(
    "text,expected",
    [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500 MB", 500 * 10**6), ("1e3KB", 10**6), (4096, 4096)],
)
def test_sizes_parse(text, expected):
    from qlora_lite.config.units import parse_size

    assert parse_size(text, "max shard size") == expected


@pytest.mark.parametrize("text", ["", "0GB", "0.4B", "-1GB", "5 potatoes", "1e300GB", 2**70, True, "inf GB"])
def test_sizes_that_are_not_sizes_are_refused(text):
    from qlora_lite.config.units import parse_size

    with pytest.raises(ConfigError, match="max shard size"):
        parse_size(text, "max shard size")


def test_out_of_memory_advice_first_gives_back_selective_recompute():
    config = load_config(EXAMPLE, {"model": PRESET, "train.checkpoint_every": 2})
    selective = advise_after_oom(config, budget=None)
    every_layer = advise_after_oom(load_config(EXAMPLE, {"model": PRESET}), budget=None)
    assert selective.total > every_layer.total  # keeping half the layers whole costs memory
    assert selective.change.overrides == {"train.checkpoint_every": 1}
    assert "every layer recomputed" in selective.change.description
    assert "checkpoint_every" not in str(every_layer.change.overrides)  # nothing to give back at k = 1
