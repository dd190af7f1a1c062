"""Adapters, export and directory locks under stress: an adapter replaced mid-export, verify with LoRA dropout,
a full disk at every point of an export, one lock protocol across train and export, eval mode after
load_adapter, tensors whose rank differs from the config, and the library's errors for bad arguments."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora_lite.export.hf_dir as hf_dir
import qlora_lite.export.merge as merge
from qlora_lite import apply_lora, load_adapter, load_quantized, save_adapter
from qlora_lite.cli import main
from qlora_lite.config.load import config_from_dict
from qlora_lite.errors import AdapterError, ConfigError, ExportError, LockedError, QloraLiteError
from qlora_lite.export.adapter import adapter_quant_settings, read_adapter_config
from qlora_lite.export.hf_dir import export_merged
from qlora_lite.export.verify import VERIFY_TOLERANCE, verify_merged
from qlora_lite.io.faults import ENOSPC_ENV, KILL_ENV
from qlora_lite.io.lock import DirectoryLock
from qlora_lite.io.safetensors import SafetensorsFile
from qlora_lite.model.lora import lora_layers
from qlora_lite.training.loop import train
from qlora_lite.training.reporter import Reporter

from .helpers import hidden, one_error_line, snapshot

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(autouse=True)
def _no_inherited_faults(monkeypatch):
    for name in (KILL_ENV, ENOSPC_ENV):
        monkeypatch.delenv(name, raising=False)


def _nonzero_b(model, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """(base, adapter A, adapter B, adapter D): A and B differ only in B's values; D was trained with dropout 0.05."""
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("reliability-adapters")
    model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
    apply_lora(model, r=4, alpha=8, seed=0)
    made = []
    for seed in (1, 2):
        _nonzero_b(model, seed)
        made.append(save_adapter(model, root / f"adapter-{seed}"))
    model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
    apply_lora(model, r=4, alpha=8, dropout=0.05, seed=0)
    _nonzero_b(model, 3)
    made.append(save_adapter(model, root / "adapter-dropout"))
    return base, *made


def export_argv(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *extra]


def tensor_count(base: Path) -> int:
    return len(SafetensorsFile(base / "model.safetensors").keys())


# ------------------------------------------------------------------------ one adapter per export
@pytest.mark.parametrize("when", [0, "middle", "last"])
def test_adapter_replaced_during_export_gives_the_old_merge(adapters, tmp_path, monkeypatch, when):
    base, first, second, _ = adapters
    clean_first = snapshot(export_merged(base, first, tmp_path / "clean-first"))
    assert snapshot(export_merged(base, second, tmp_path / "clean-second")) != clean_first  # the test can tell

    adapter = tmp_path / "adapter"
    shutil.copytree(first, adapter)
    replacement = tmp_path / f".{WEIGHTS}.new"
    shutil.copyfile(second / WEIGHTS, replacement)
    at = {0: 0, "middle": tensor_count(base) // 2, "last": tensor_count(base) - 1}[when]
    real_fault_point = hf_dir.fault_point

    def replace_adapter(point: str, count: int) -> None:
        if (point, count) == ("in-export", at):
            os.replace(replacement, adapter / WEIGHTS)  # atomic, as save_adapter replaces it
        real_fault_point(point, count)

    monkeypatch.setattr(hf_dir, "fault_point", replace_adapter)
    merged = export_merged(base, adapter, tmp_path / "merged")
    assert not replacement.exists()  # the replacement did happen mid-export
    assert snapshot(merged) == clean_first  # byte for byte the old adapter's merge, no tensor of the new one


def test_adapter_config_rewritten_while_reading_is_refused(adapters, tmp_path, monkeypatch):
    import qlora_lite.export.adapter as adapter_module

    base, first, _, _ = adapters
    adapter = tmp_path / "adapter"
    shutil.copytree(first, adapter)
    real_init = adapter_module.AdapterWeights.__init__

    def read_then_rewrite(self, path: Path) -> None:
        real_init(self, path)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["lora_alpha"] = 32  # another adapter's config lands between our two reads
        (adapter / "adapter_config.json").write_text(json.dumps(config))

    monkeypatch.setattr(adapter_module.AdapterWeights, "__init__", read_then_rewrite)
    with pytest.raises(AdapterError, match=r"changed while it was being read; read it again once it is written\."):
        export_merged(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------------- verify and eval
def test_verify_passes_an_adapter_trained_with_dropout(adapters, tmp_path, capsys):
    base, _, _, dropout = adapters
    assert json.loads((dropout / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    assert main(export_argv(base, dropout, tmp_path / "merged", "--verify")) == 0
    said = " ".join(capsys.readouterr().out.split())
    largest = float(re.search(r"largest relative logit difference (\S+),", said).group(1))
    assert largest < VERIFY_TOLERANCE


def test_verify_still_fails_a_wrong_merge(adapters, tmp_path, capsys, monkeypatch):
    base, _, _, dropout = adapters
    out = tmp_path / "merged"
    export_merged(base, dropout, out)
    # the adapter with B doubled after the merge: the merged model no longer matches it
    doubled = tmp_path / "doubled"
    shutil.copytree(dropout, doubled)
    tensors = load_file(str(doubled / WEIGHTS))
    tensors = {k: v * 2 if ".lora_B." in k else v for k, v in tensors.items()}
    save_file(tensors, str(doubled / WEIGHTS), metadata={"format": "pt"})
    assert verify_merged(out, base, doubled).max_rel > VERIFY_TOLERANCE

    # a merge that adds the adapter twice: the CLI's verify catches it and exits 1
    real_merged_tensor = merge._merged_tensor

    def merged_twice(item, plan, device):
        if item.lora is not None:
            item = dataclasses.replace(item, lora=dataclasses.replace(item.lora, scaling=2 * item.lora.scaling))
        return real_merged_tensor(item, plan, device)

    monkeypatch.setattr(merge, "_merged_tensor", merged_twice)
    capsys.readouterr()
    assert main(export_argv(base, dropout, tmp_path / "wrong", "--verify")) == 1
    assert "verify failed" in capsys.readouterr().err


def test_load_adapter_returns_the_model_in_eval_mode(adapters):
    base, _, _, dropout = adapters
    model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
    model.train()
    assert load_adapter(model, dropout) is model
    assert not any(module.training for module in model.modules())  # dropout of every LoRA layer is off
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


# -------------------------------------------------------------------------------- rank vs config
def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_tensors_of_another_rank_than_the_config_are_refused(adapters, tiny_model_dir, tmp_path):
    base, first, _, _ = adapters
    wrong = _with_config(first, tmp_path / "wrong-r", r=8)
    pattern = r"adapter tensor '[^']+lora_A\.weight' has rank 4 \(shape \[4, \d+\]\) but .*wrong-r/adapter_config.json says r is 8"
    with pytest.raises(AdapterError, match=pattern):
        export_merged(base, wrong, tmp_path / "merged")
    with pytest.raises(AdapterError, match=pattern):
        load_adapter(load_quantized(base, device="cpu", load_tokenizer=False)[0], wrong)
    # a model that already has LoRA of the tensors' rank: the config's r still has to agree
    model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
    apply_lora(model, r=4, alpha=8)
    with pytest.raises(AdapterError, match=pattern):
        load_adapter(model, wrong)
    # rank_pattern names the rank of some layers: those must agree with it
    patterned = _with_config(first, tmp_path / "pattern", rank_pattern={"q_proj": 2})
    with pytest.raises(
        AdapterError, match=r"q_proj\.lora_A\.weight' has rank 4 .* says rank_pattern gives .*q_proj rank 2"
    ):
        export_merged(base, patterned, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("change,fragment", [
    ({"r": "4"}, '"r" is "4" (a string) but must be a positive whole number'),
    ({"r": 0}, '"r" is 0 (a whole number) but must be a positive whole number'),
    ({"r": True}, '"r" is true (true/false) but must be a positive whole number'),
    ({"lora_alpha": "16"}, '"lora_alpha" is "16" (a string) but must be a finite number'),
    ({"lora_alpha": float("nan")}, '"lora_alpha" is NaN (a number) but must be a finite number such as 16'),
    ({"target_modules": 3}, '"target_modules" is 3 (a whole number) but must be a list of module names'),
    ({"target_modules": ["q_proj", 1]}, '"target_modules" is ["q_proj", 1] (a list) but must be a list of module names'),
    ({"use_rslora": "yes"}, '"use_rslora" is "yes" (a string) but must be true or false'),
    ({"rank_pattern": {"q_proj": "8"}}, """"rank_pattern['q_proj']" is "8" (a string)"""),
    ({"rank_pattern": {"(": 8}}, "rank_pattern key '(' is not a valid regular expression"),
    ({"alpha_pattern": [1]}, '"alpha_pattern" is [1] (a list) but must be an object'),
    ({"qlora_lite": None}, '"qlora_lite" is null (null) but must be an object'),
    ({"qlora_lite": {"bits": "8"}}, '"qlora_lite.bits" is "8" (a string) but must be a whole number (4 or 8)'),
    ({"qlora_lite": {"double_quant": "false"}}, '"qlora_lite.double_quant" is "false" (a string) but must be true or false'),
    ({"qlora_lite": {"blocksize": 64.0}}, '"qlora_lite.blocksize" is 64.0 (a number) but must be a whole number'),
    ({"qlora_lite": {"quantized_modules": "q_proj"}}, '"qlora_lite.quantized_modules" is "q_proj" (a string)'),
    ({"qlora_lite": {"quant_type": "nf5"}}, "records invalid quantization settings (qlora_lite.quant_type"),
])  # fmt: skip
def test_adapter_config_of_the_wrong_shape_names_the_key(adapters, tmp_path, change, fragment):
    _, first, _, _ = adapters
    adapter = _with_config(first, tmp_path / "adapter", **change)
    with pytest.raises(AdapterError) as err:
        read_adapter_config(adapter)
    message = str(err.value)
    assert fragment in message and str(adapter / "adapter_config.json") in message, message
    assert "only 4 and 8 are supported" not in message and message.endswith(".")


def test_quant_record_of_the_wrong_type_is_not_coerced():
    with pytest.raises(
        AdapterError, match=r'"qlora_lite\.bits" is "8" \(a string\) but must be a whole number \(4 or 8\)'
    ):
        adapter_quant_settings({"qlora_lite": {"bits": "8"}})
    with pytest.raises(AdapterError, match=r'"qlora_lite" is \[4\] \(a list\) but must be an object'):
        adapter_quant_settings({"qlora_lite": [4]})
    settings, recorded = adapter_quant_settings({"qlora_lite": {"bits": 8}})
    assert settings.bits == 8 and recorded
    assert adapter_quant_settings({})[1] is False  # peft's adapters carry no record


# ---------------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("at", [0, "middle", "last", "config.json"])
@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_at_export_names_the_output_and_leaves_nothing(adapters, tmp_path, capsys, monkeypatch, at, existing):
    base, first, second, _ = adapters
    out = tmp_path / "merged"
    before = snapshot(export_merged(base, second, out)) if existing else None
    if at == "config.json":

        def full_disk(path, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(hf_dir, "write_json_atomic", full_disk)
    else:
        count = {0: 0, "middle": tensor_count(base) // 2, "last": tensor_count(base) - 1}[at]
        monkeypatch.setenv(ENOSPC_ENV, f"in-export:{count}")
    assert main(export_argv(base, first, out, "--overwrite")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: writing the merged model to {out} failed ([Errno 28] No space left on device")
    assert line.endswith("nothing was changed there, free disk space or fix permissions and export again.")
    assert hidden(tmp_path) == []  # no lock file, no temporary dir
    if existing:
        assert snapshot(out) == before
    else:
        assert not out.exists()


# --------------------------------------------------------------------------- one writer per directory
def _hold_lock_in_a_subprocess(directory: Path, purpose: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from qlora_lite.io.lock import DirectoryLock; "
            "lock = DirectoryLock(sys.argv[1], purpose=sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)",
            str(directory),
            purpose,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_export_overwrite_of_a_run_that_is_training_is_refused(adapters, tmp_path, capsys):
    base, first, _, _ = adapters
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "optimizer.pt").write_bytes(b"state")
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 4.0}\n')
    before = snapshot(run)
    holder = _hold_lock_in_a_subprocess(run, "qlora-lite train")  # what `train` takes on its run dir
    try:
        assert main(export_argv(base, first, run, "--overwrite")) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line == (
            f"error: {run} is in use by pid {holder.pid} (qlora-lite train); "
            "wait for it to finish or choose another output directory."
        )
        assert snapshot(run) == before
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.") and p.name.endswith(".tmp")] == []
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    assert main(export_argv(base, first, run, "--overwrite")) == 0  # free once the run is gone
    assert (run / "model.safetensors").is_file() and hidden(tmp_path) == []


def _train_config(model_dir: Path, out: Path, data: Path, **train_settings):
    settings = dict(max_steps=2, micro_batch_size=2, grad_accum=1, optimizer="adamw", eval_every=0, save_every=1)
    settings.update(keep_checkpoints=5)
    settings.update(train_settings)
    return config_from_dict(
        {
            "model": str(model_dir),
            "output_dir": str(out),
            "lora": {"r": 4, "alpha": 8},
            "data": {"train": str(data), "max_seq_len": 32},
            "train": settings,
        }
    )


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"item {i}: ", "completion": f"y{i}"}) + "\n" for i in range(4)))
    return path


def test_a_live_train_and_an_export_share_one_lock(adapters, tmp_path, data_file, capsys):
    base, first, _, _ = adapters
    run = tmp_path / "run"
    attempts: list[tuple[int, str]] = []

    class ExportMidRun(Reporter):
        def on_checkpoint(self, step: int, path: Path) -> None:
            capsys.readouterr()
            code = main(export_argv(base, first, run, "--overwrite"))
            attempts.append((code, capsys.readouterr().err))

    result = train(_train_config(base, run, data_file), reporter=ExportMidRun())
    assert result.steps == 2 and len(attempts) == 2
    for code, err in attempts:
        assert code == 2 and f"{run} is in use by pid {os.getpid()} (qlora-lite train)" in one_error_line(err)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert hidden(tmp_path) == [] and hidden(run) == []

    # and the other way round: a train into the output an export is writing is refused
    with DirectoryLock(tmp_path / "merged", purpose="qlora-lite export"):
        with pytest.raises(LockedError, match=r"merged is in use by pid \d+ \(qlora-lite export\)"):
            train(_train_config(base, tmp_path / "merged", data_file))
    assert not (tmp_path / "merged").exists()


def test_train_into_a_users_folder_is_refused(tiny_model_dir, tmp_path, data_file):
    base = tiny_model_dir("llama")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for resume in (False, True):
        with pytest.raises(
            ConfigError,
            match=r"mine is not empty and is not a qlora-lite run directory; choose an empty or new output_dir\.",
        ):
            train(_train_config(base, mine, data_file), resume=resume)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"] and hidden(tmp_path) == []
    # a folder holding only an earlier version's lock file counts as empty; an existing run is resumed
    old = tmp_path / "old"
    old.mkdir()
    (old / ".qlora-lite.lock").write_text("pid 1 (qlora-lite train)")
    assert train(_train_config(base, old, data_file, max_steps=1)).steps == 1
    assert train(_train_config(base, old, data_file, max_steps=2), resume=True).steps == 2


# ------------------------------------------------------------------------- the API's bad arguments
def test_library_calls_with_bad_arguments_raise_qlora_lite_errors(adapters, tmp_path):
    base, first, _, _ = adapters
    model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
    cases = [
        (AdapterError, "needs the torch model from load_quantized", lambda: load_adapter("a model", first)),
        (AdapterError, "does not exist", lambda: load_adapter(model, tmp_path / "nope")),
        (AdapterError, "must be a path", lambda: load_adapter(model, 42)),
        (AdapterError, "needs the torch model from load_quantized", lambda: save_adapter(None, tmp_path / "a")),
        (AdapterError, "has no LoRA adapters", lambda: save_adapter(model, tmp_path / "a")),
        (
            ExportError,
            "use 'float16' or 'bfloat16'",
            lambda: export_merged(base, first, tmp_path / "m", dtype="float32"),
        ),
        (AdapterError, "does not exist", lambda: export_merged(base, tmp_path / "nope", tmp_path / "m")),
        (ExportError, "must be a path", lambda: export_merged(base, first, 3.5)),
        (QloraLiteError, "does not exist", lambda: export_merged(tmp_path / "no-base", first, tmp_path / "m")),
    ]
    for kind, fragment, call in cases:
        with pytest.raises(kind, match=re.escape(fragment)):
            call()
    apply_lora(model, r=4, alpha=8)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(AdapterError, match="adapter output path .*file is a file"):
        save_adapter(model, file)
    assert not (tmp_path / "m").exists() and not (tmp_path / "a").exists()
