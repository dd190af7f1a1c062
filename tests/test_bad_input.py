"""Bad input everywhere, through the real command line: every case in `CASES` builds one broken input, runs
`qlora_lite.cli.main(argv)` and must get exit code 2, exactly one line on stderr starting with "error:", no
traceback, and a message holding the case's fragment (which names the file, line or key, and the fix).

docs/errors.md is generated from this table:

    QLORA_LITE_WRITE_ERROR_TABLE=docs/errors.md python -m pytest tests/test_bad_input.py

writes every case with its command and the message observed (temporary paths shown relative to the case's
folder), when all cases ran; `test_docs_table_lists_every_case` fails when a case is missing from the file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qlora_lite import apply_lora, load_quantized, save_adapter
from qlora_lite.cli import main
from qlora_lite.errors import ConfigError
from qlora_lite.io.atomic import atomic_file
from qlora_lite.io.lock import DirectoryLock

from . import bad_cases_export, bad_cases_loading, bad_cases_training
from .bad_input_support import DROP, Case, Workspace

TABLE_ENV = "QLORA_LITE_WRITE_ERROR_TABLE"
DOCS_TABLE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _locked(lock_dir: Callable[[Workspace], Path], argv: Callable[[Workspace], list[str]], beside: bool = False):
    """Build step that holds a DirectoryLock (as another process would) until the case has run."""

    def build(ws: Workspace) -> list[str]:
        ws.held_lock = DirectoryLock(lock_dir(ws), purpose="another qlora-lite process", beside=beside).acquire()
        return argv(ws)

    return build


def _existing_run(ws: Workspace) -> list[str]:
    (ws.root / "run").mkdir()
    ws.write("run/metrics.jsonl", '{"step": 1, "loss": 5.0}\n')
    return ws.train()


def _changed_resume(ws: Workspace) -> list[str]:
    assert main(ws.train()) == 0  # one real step, so there is a checkpoint with its settings fingerprint
    return ws.train("--resume", "--lora.r", "8")


def _adapter_without_b(ws: Workspace) -> list[str]:
    from safetensors.torch import load_file, save_file

    dst = ws.adapter_copy("adapter-missing")
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    dropped = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    del tensors[dropped]
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ws.export(dst)


def _adapter_config(name: str, content: str | None = None, **changes: Any) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        dst = ws.adapter_copy(name)
        if content is not None:
            (dst / "adapter_config.json").write_text(content)
        else:
            config = json.loads((dst / "adapter_config.json").read_text())
            config.update(changes)
            (dst / "adapter_config.json").write_text(json.dumps(config))
        return ws.export(dst)

    return build


def _pickle_adapter(ws: Workspace) -> list[str]:
    dst = ws.adapter_copy("adapter-bin")
    (dst / "adapter_model.safetensors").rename(dst / "adapter_model.bin")
    return ws.export(dst)


def _truncated_weights(ws: Workspace) -> list[str]:
    dst = ws.model_copy("truncated")
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ws.train(model=str(dst))


def _index_missing_shard(ws: Workspace) -> list[str]:
    dst = ws.model_copy("sharded")
    (dst / "model.safetensors").rename(dst / "model-00001-of-00002.safetensors")
    weight_map = {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ws.train(model=str(dst))


def _out_not_empty(ws: Workspace) -> list[str]:
    ws.write("merged/notes.txt", "keep me")
    return ws.export()


CASES: list[Case] = [
    # ---------------------------------------------------------------------------------- command line
    Case(
        "cli-unknown-command",
        "a sub-command that does not exist",
        lambda ws: ["trian"],
        "unknown command 'trian' (did you mean 'train'?); choose one of train, data, export, memory, chat, generate, demo, doctor.",
    ),
    Case(
        "cli-no-command",
        "no sub-command at all",
        lambda ws: [],
        "no command given; run `qlora-lite COMMAND` with COMMAND one of train, data, export, memory, chat, generate, demo",
    ),
    Case(
        "cli-train-no-config",
        "`train` without its config file",
        lambda ws: ["train"],
        "the following arguments are required: config; see `qlora-lite train --help`.",
    ),
    Case(
        "cli-export-missing-arguments",
        "`export` without --adapter and --out",
        lambda ws: ["export", "--base", str(ws.model)],
        "the following arguments are required: --adapter, --out; see `qlora-lite export --help`.",
    ),
    Case(
        "cli-export-unknown-option",
        "an option `export` does not have",
        lambda ws: ws.export(None, None, "--fast"),
        "unrecognized arguments: --fast; see `qlora-lite export --help`.",
    ),
    Case(
        "cli-export-bad-choice",
        "a value outside an option's choices",
        lambda ws: ws.export(None, None, "--dtype", "float32"),
        "argument --dtype: invalid choice: 'float32' (choose from 'float16', 'bfloat16')",
    ),
    Case(
        "cli-memory-bad-number",
        "a word where a number is expected",
        lambda ws: ["memory", "llama-3.2-1b", "--rank", "many"],
        "argument --rank: invalid int value: 'many'; see `qlora-lite memory --help`.",
    ),
    Case(
        "cli-override-without-value",
        "`--section.key` with no value",
        lambda ws: ws.train("--train.lr"),
        "override --train.lr has no value; write --train.lr VALUE.",
    ),
    Case(
        "cli-override-followed-by-override",
        "`--section.key` directly followed by another override",
        lambda ws: ws.train("--train.lr", "--lora.r", "8"),
        "override --train.lr has no value; write --train.lr VALUE.",
    ),
    Case(
        "cli-stray-argument",
        "a word that is not an override",
        lambda ws: ws.train("fast"),
        "unexpected argument 'fast'; overrides look like --section.key value.",
    ),
    # ------------------------------------------------------------------------------------ the config
    Case(
        "config-missing",
        "a config path that does not exist",
        lambda ws: ["train", str(ws.root / "nope.yaml")],
        "config file ./nope.yaml does not exist; give the path of a YAML training config.",
    ),
    Case(
        "config-directory",
        "a directory given as the config",
        lambda ws: ["train", str(ws.root)],
        "config path . is a directory; give the path of a YAML training config file.",
    ),
    Case(
        "config-not-yaml",
        "YAML syntax error",
        lambda ws: ["train", str(ws.write("bad.yaml", "model: [unclosed\n"))],
        "config file ./bad.yaml line 2 is not valid YAML",
    ),
    Case(
        "config-a-list",
        "a YAML list instead of a mapping",
        lambda ws: ["train", str(ws.write("list.yaml", "- model\n- data\n"))],
        "config file ./list.yaml holds a YAML list, not a mapping of settings; write `key: value` lines",
    ),
    Case(
        "config-not-utf8",
        "non-UTF-8 bytes in the YAML",
        lambda ws: ["train", str(ws.write("latin1.yaml", b"model: m\noutput_dir: caf\xe9\n"))],
        "config file ./latin1.yaml line 2 is not UTF-8 text (invalid continuation byte); save the file as UTF-8.",
    ),
    Case(
        "config-unknown-key",
        "an unknown top-level key",
        lambda ws: ws.train(learning_rate=0.1),
        "unknown config key 'learning_rate'; valid keys are: model, output_dir, revision, trust_remote_code, quant, lora, data, train.",
    ),
    Case(
        "config-unknown-section-key",
        "an unknown key inside a section",
        lambda ws: ws.train(train__learning_rate=0.1),
        "unknown config key 'train.learning_rate'; valid keys are: train.max_steps,",
    ),
    Case(
        "config-unknown-override",
        "an unknown key on the command line",
        lambda ws: ws.train("--lora.rank", "4"),
        "unknown config key 'lora.rank' (did you mean 'lora.r'?); valid keys are:",
    ),
    Case(
        "config-section-not-mapping",
        "a section that is a number",
        lambda ws: ws.train(train=5),
        "config section 'train' must be a mapping of keys to values, got 5; write it as indented `key: value` lines under `train:`.",
    ),
    Case(
        "config-lr-word",
        "`lr` given as a word",
        lambda ws: ws.train(train__lr="fast"),
        "train.lr got 'fast'; expected a finite number such as 2e-4.",
    ),
    Case(
        "config-lr-nan",
        "`lr` not finite",
        lambda ws: ws.train("--train.lr", "nan"),
        "train.lr got 'nan'; expected a finite number such as 2e-4.",
    ),
    Case(
        "config-rank-word",
        "a word for an integer",
        lambda ws: ws.train(lora__r="eight"),
        "lora.r got 'eight'; expected a whole number.",
    ),
    Case(
        "config-steps-fraction",
        "a fraction for an integer",
        lambda ws: ws.train(train__max_steps=2.5),
        "train.max_steps got 2.5; expected a whole number.",
    ),
    Case(
        "config-bool-word",
        "a word that is not true/false",
        lambda ws: ws.train(data__packing="maybe"),
        "data.packing got 'maybe'; expected true or false.",
    ),
    Case(
        "config-rank-zero",
        "rank 0",
        lambda ws: ws.train(lora__r=0),
        "lora.r is 0; it must be a positive whole number such as 8 or 16.",
    ),
    Case(
        "config-batch-negative",
        "a negative micro-batch",
        lambda ws: ws.train(train__micro_batch_size=-2),
        "train.micro_batch_size is -2; it must be a positive whole number (at most 65536).",
    ),
    Case(
        "config-seq-zero",
        "max_seq_len 0",
        lambda ws: ws.train(data__max_seq_len=0),
        "data.max_seq_len is 0; it must be a positive number of tokens (at most 16777216).",
    ),
    Case(
        "config-lr-negative",
        "a negative learning rate",
        lambda ws: ws.train(train__lr=-1e-4),
        "train.lr is -0.0001; it must be a positive number such as 2e-4.",
    ),
    Case(
        "config-dropout-range",
        "dropout outside [0, 1)",
        lambda ws: ws.train(lora__dropout=1.5),
        "lora.dropout is 1.5; it must be in [0, 1).",
    ),
    Case("config-bits", "3-bit quantization", lambda ws: ws.train(quant__bits=3), "quant.bits is 3; use 4 or 8."),
    Case(
        "config-optimizer",
        "an optimizer that does not exist",
        lambda ws: ws.train(train__optimizer="sgd"),
        "train.optimizer is 'sgd'; use paged_adamw_8bit, adamw_8bit or adamw.",
    ),
    Case(
        "config-no-model",
        "no `model`",
        lambda ws: ws.train(model=DROP),
        "model is not set; give the path of a Hugging Face model directory.",
    ),
    Case(
        "config-no-data",
        "no `data.train`",
        lambda ws: ws.train(data__train=DROP),
        "data.train is not set; give the path of a JSONL training file.",
    ),
    Case(
        "config-seq-over-context",
        "max_seq_len longer than the model's context",
        lambda ws: ws.train(data__max_seq_len=4096),
        "data.max_seq_len is 4096, longer than the model's context of 256 tokens; set data.max_seq_len <= 256.",
    ),
    Case("config-rank-too-large", "a rank larger than a layer", lambda ws: ws.train(lora__r=40), "r <= 32"),
    Case(
        "config-unknown-target",
        "a target module the model does not have",
        lambda ws: ws.train(lora__target_modules=["query_key_value"]),
        "'query_key_value'",
    ),
    # -------------------------------------------------------------------------------------- the data
    Case(
        "data-missing",
        "a data file that does not exist",
        lambda ws: ws.train(data__train=str(ws.root / "nope.jsonl")),
        "data file ./nope.jsonl does not exist; give the path of a JSONL file.",
    ),
    Case(
        "data-directory",
        "a directory given as data",
        lambda ws: ws.train(data__train=str(ws.root)),
        ". is a directory; give the path of a .jsonl or .json data file.",
    ),
    Case(
        "data-malformed-line",
        "a line that is not JSON",
        lambda ws: ws.train(data__train=str(ws.jsonl("bad.jsonl", {"text": "ok"}, '{"text": "broken'))),
        "./bad.jsonl line 2 is not valid JSON (Unterminated string starting at column 10); fix or remove that line.",
    ),
    Case(
        "data-missing-fields",
        "a record with none of the known fields",
        lambda ws: ws.train(data__train=str(ws.jsonl("fields.jsonl", {"input": "x", "output": "y"}))),
        "./fields.jsonl line 1: record has none of the fields 'text', 'prompt'+'completion' or 'messages' (it has: input, output); "
        "use one of TRL's three formats.",
    ),
    Case(
        "data-prompt-without-completion",
        "a prompt without its completion",
        lambda ws: ws.train(data__train=str(ws.jsonl("half.jsonl", {"text": "ok"}, {"prompt": "Q: "}))),
        "./half.jsonl line 2: record has 'prompt' or 'completion' but no 'completion'; prompt/completion records need both.",
    ),
    Case(
        "data-field-type",
        "a field of the wrong type",
        lambda ws: ws.train(data__train=str(ws.jsonl("type.jsonl", {"text": 5}))),
        "./type.jsonl line 1: 'text' must be a string, got int.",
    ),
    Case(
        "data-not-an-object",
        "a line that is a JSON list",
        lambda ws: ws.train(data__train=str(ws.jsonl("list.jsonl", ["a", "b"]))),
        "./list.jsonl line 1 is a JSON list, not an object",
    ),
    Case(
        "data-no-assistant",
        "a conversation without an assistant turn",
        lambda ws: ws.train(data__train=str(ws.jsonl("chat.jsonl", {"messages": [{"role": "user", "content": "hi"}]}))),
        "./chat.jsonl line 1: 'messages' has no assistant turn, so there is nothing to learn; add one.",
    ),
    Case(
        "data-not-utf8",
        "non-UTF-8 bytes in a data line",
        lambda ws: ws.train(data__train=str(ws.write("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))),
        "./latin1.jsonl line 2 is not UTF-8 text (invalid continuation byte at byte 28 of the file); save the file as UTF-8.",
    ),
    Case(
        "data-empty",
        "an empty data file",
        lambda ws: ws.train(data__train=str(ws.write("empty.jsonl", ""))),
        "./empty.jsonl holds no records; add at least one JSON object.",
    ),
    Case(
        "data-json-not-array",
        "a .json file holding an object",
        lambda ws: ws.train(data__train=str(ws.write("one.json", '{"text": "x"}'))),
        "./one.json holds a JSON dict, not an array of records; write a list of objects or JSONL.",
    ),
    Case(
        "data-too-long-no-truncation",
        "every record longer than max_seq_len, truncation off",
        lambda ws: ws.train(
            data__train=str(ws.jsonl("long.jsonl", {"text": "x" * 40}, {"text": "y" * 50})),
            data__max_seq_len=16,
            data__truncation=False,
        ),
        "./long.jsonl line 1: the record is 41 tokens long, more than data.max_seq_len=16; raise data.max_seq_len, shorten the record, "
        "or set data.truncation: true.",
    ),
    Case(
        "data-no-target-left",
        "every completion cut away by truncation",
        lambda ws: ws.train(
            data__train=str(
                ws.jsonl("cut.jsonl", {"prompt": "p" * 40, "completion": "c"}, {"prompt": "q" * 30, "completion": "d"})
            ),
            data__max_seq_len=16,
        ),
        "no usable records (2 read, 2 without any target token left after truncation to 16 tokens); add data or raise data.max_seq_len.",
    ),
    Case(
        "data-eval-fraction",
        "an eval split that leaves no training data",
        lambda ws: ws.train(data__eval_fraction=0.9),
        "data.eval_fraction=0.9 leaves no training records out of 2; lower it or add data.",
    ),
    Case(
        "data-bad-eval-file",
        "a malformed eval file",
        lambda ws: ws.train(data__eval=str(ws.jsonl("eval.jsonl", "not json"))),
        "./eval.jsonl line 1 is not valid JSON",
    ),
    # --------------------------------------------------------------------------------- the model dir
    Case(
        "model-missing",
        "a model dir that does not exist",
        lambda ws: ws.train(model=str(ws.root / "nope")),
        "model directory ./nope does not exist; give the path of a Hugging Face model directory.",
    ),
    Case(
        "model-is-a-file",
        "a file given as the model dir",
        lambda ws: ws.train(model=str(ws.data)),
        "./train.jsonl is a file, not a model directory; give the folder that holds config.json.",
    ),
    Case(
        "model-no-config",
        "a model dir without config.json",
        lambda ws: ws.train(model=str(ws.model_copy("noconf", ("config.json",)))),
        "./noconf has no config.json; point to a Hugging Face model directory (config.json + *.safetensors).",
    ),
    Case(
        "model-config-not-json",
        "a config.json that is not JSON",
        lambda ws: ws.train(model=str(ws.write("badjson/config.json", "{oops").parent)),
        "./badjson/config.json is not valid JSON",
    ),
    Case(
        "model-unknown-architecture",
        "a model_type transformers does not know",
        lambda ws: ws.train(model=str(ws.model_config("alien", model_type="alien-lm"))),
        "./alien/config.json declares model_type 'alien-lm', which transformers",
    ),
    Case(
        "model-needs-remote-code",
        "a model that needs its own code, trust_remote_code off",
        lambda ws: ws.train(model=str(ws.model_config("remote", auto_map={"AutoConfig": "configuration_x.XConfig"}))),
        "./remote needs its own model code (config.json has auto_map), which runs only with trust_remote_code: true; "
        "turn that on only if you trust the code in that directory.",
    ),
    Case(
        "model-remote-code-missing",
        "trust_remote_code on (passed through by the CLI), the code file missing",
        lambda ws: ws.train(
            "--trust_remote_code",
            "true",
            model=str(ws.model_config("remote", auto_map={"AutoConfig": "configuration_x.XConfig"})),
        ),
        "the model code of ./remote cannot be loaded (./remote does not appear to have a file named configuration_x.py)",
    ),
    Case(
        "model-no-tokenizer",
        "a model dir without tokenizer files",
        lambda ws: ws.train(model=str(ws.model_copy("notok", TOKENIZER_FILES))),
        "the model directory ./notok has no tokenizer files; copy the tokenizer next to config.json.",
    ),
    Case(
        "model-no-weights",
        "a model dir without weights",
        lambda ws: ws.train(model=str(ws.model_copy("noweights", ("model.safetensors",)))),
        "./noweights has no *.safetensors weight files; point to a Hugging Face model directory.",
    ),
    Case(
        "model-pickle-only",
        "pickle weights only",
        lambda ws: _pickle_model(ws),
        "./pickled holds only pickle weights (pytorch_model.bin), which qlora-lite does not load because unpickling can run arbitrary code",
    ),
    Case(
        "model-corrupt-header",
        "a safetensors file with a broken header",
        lambda ws: ws.train(model=str(_corrupt_header(ws))),
        "./corrupt/model.safetensors is not a readable safetensors file (header length 16 does not fit the file); re-save or re-download it.",
    ),
    Case(
        "model-truncated-weights",
        "a safetensors file cut short",
        _truncated_weights,
        "./truncated/model.safetensors ends early; the file is truncated, re-save or re-download it.",
    ),
    Case(
        "model-index-missing-shard",
        "an index naming a shard that is not there",
        _index_missing_shard,
        "./sharded/model.safetensors.index.json lists model-00002-of-00002.safetensors, which is not in ./sharded; download the missing shard.",
    ),
    Case(
        "model-weights-of-another-config",
        "weights that do not belong to config.json (more layers declared)",
        lambda ws: ws.train(model=str(ws.model_config("deeper", num_hidden_layers=3))),
        "the weights do not belong to this config.json.",
    ),
    # ------------------------------------------------------------------------------------ the adapter
    Case(
        "adapter-missing",
        "an adapter dir that does not exist",
        lambda ws: ws.export(ws.root / "nope"),
        "adapter directory ./nope does not exist; give the adapter/ folder of a run (or a peft adapter dir).",
    ),
    Case(
        "adapter-no-config",
        "an adapter dir without adapter_config.json",
        lambda ws: ws.export(_without(ws.adapter_copy("noconf"), "adapter_config.json")),
        "./noconf has no adapter_config.json; point to a directory written by save_adapter or peft.",
    ),
    Case(
        "adapter-config-not-json",
        "an adapter_config.json that is not JSON",
        _adapter_config("badjson", "{oops"),
        "./badjson/adapter_config.json is not valid JSON",
    ),
    Case(
        "adapter-not-lora",
        "a peft adapter of another kind",
        _adapter_config("prefix", peft_type="PREFIX_TUNING"),
        "./prefix/adapter_config.json describes a PREFIX_TUNING adapter; only LoRA adapters are supported.",
    ),
    Case(
        "adapter-pickle-weights",
        "adapter weights as a pickle (.bin)",
        _pickle_adapter,
        "./adapter-bin has no adapter_model.safetensors; only safetensors adapters are loaded.",
    ),
    Case(
        "adapter-wrong-base",
        "an adapter trained on another base (hidden size 32)",
        lambda ws: ws.export(ws.narrow_adapter),
        "the adapter belongs to a different base model.",
    ),
    Case(
        "adapter-missing-key",
        "an adapter with a lora_B tensor missing",
        _adapter_without_b,
        "for its other half; re-save the adapter.",
    ),
    # -------------------------------------------------------------------------------- export options
    Case(
        "export-out-not-empty",
        "an output dir with files in it, without --overwrite",
        _out_not_empty,
        "output directory ./merged exists and is not empty; choose another --out or pass --overwrite to replace it.",
    ),
    Case(
        "export-out-is-the-base",
        "the base model dir as the output",
        lambda ws: [
            "export",
            "--base",
            str(ws.model_copy("base")),
            "--adapter",
            str(ws.adapter),
            "--out",
            str(ws.root / "base"),
            "--overwrite",
        ],
        "output directory ./base holds the base model (./base); choose a different --out.",
    ),
    Case(
        "export-shard-size",
        "a shard size that is not a size",
        lambda ws: ws.export(None, None, "--max-shard-size", "lots"),
        "max shard size 'lots' is not a size; write a number with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5GB.",
    ),
    Case(
        "export-out-in-use",
        "an output dir another export is writing",
        _locked(lambda ws: ws.root / "merged", lambda ws: ws.export(), beside=True),
        "./merged is in use by pid",
    ),
    # ----------------------------------------------------------------------------- runs and commands
    Case(
        "train-run-dir-in-use",
        "a run dir another training run holds",
        _locked(lambda ws: ws.root / "run", lambda ws: ws.train()),
        "./run is in use by pid",
    ),
    Case(
        "train-existing-run",
        "a run dir that already holds a run, without --resume",
        _existing_run,
        "./run already holds a training run; pass --resume (resume=True) to continue it or choose another output_dir.",
    ),
    Case(
        "train-resume-changed-settings",
        "--resume with a setting the checkpoint depends on changed",
        _changed_resume,
        "was made with lora.r=4 but this config has lora.r=8; resume with the checkpoint's settings or start a new output_dir.",
    ),
    Case(
        "memory-unknown-model",
        "a memory report for a name that is neither a dir nor a preset",
        lambda ws: ["memory", "no-such-model"],
        "known presets: gemma-2-2b",
    ),
    Case(
        "memory-bad-budget",
        "a GPU memory that is not a size",
        lambda ws: ["memory", "llama-3.2-1b", "--gpu-memory", "12 potatoes"],
        "GPU memory '12 potatoes' is not a size or a known GPU",
    ),
    Case(
        "demo-folder-not-empty",
        "a demo folder holding other files",
        lambda ws: ["demo", "--out", str(ws.write("mine/precious.txt", "keep").parent)],
        "is not empty and was not made by the demo",
    ),
]
CASES += bad_cases_loading.CASES + bad_cases_export.CASES + bad_cases_training.CASES


def _pickle_model(ws: Workspace) -> list[str]:
    dst = ws.model_copy("pickled", ("model.safetensors",))
    (dst / "pytorch_model.bin").write_bytes(b"never unpickled")
    return ws.train(model=str(dst))


def _corrupt_header(ws: Workspace) -> Path:
    dst = ws.model_copy("corrupt")
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return dst


def _without(directory: Path, name: str) -> Path:
    (directory / name).unlink()
    return directory


# ------------------------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def good_inputs(tiny_model_dir, tmp_path_factory):
    """(model dir, adapter for it, adapter of a narrower model), made once."""
    root = tmp_path_factory.mktemp("bad-input")
    adapters = []
    for name, model_dir in (
        ("adapter", tiny_model_dir("llama")),
        ("narrow-adapter", tiny_model_dir("llama", hidden_size=32)),
    ):
        model, _ = load_quantized(model_dir, device="cpu")
        apply_lora(model, r=4, alpha=8, seed=0)
        adapters.append(save_adapter(model, root / name))
    return tiny_model_dir("llama"), adapters[0], adapters[1]


@pytest.fixture(scope="module")
def observed():
    """Collects (case, command, config change, message) rows; writes the docs table when asked and every case ran."""
    rows: dict[str, tuple[Case, str, str, str]] = {}
    yield rows
    target = os.environ.get(TABLE_ENV)
    if target and len(rows) == len(CASES):
        write_table(Path(target), [rows[c.id] for c in CASES])


def write_table(path: Path, rows: list[tuple[Case, str, str, str]]) -> None:
    """docs/errors.md from the observed (case, command, config change, message) rows."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Error messages",
        "",
        "Every bad input qlora-lite refuses, with the command that was run and the message printed on stderr. Each exits",
        "with code 2 and prints exactly one line (`--debug` adds the traceback). A CUDA out-of-memory during training",
        "exits with code 3 and prints the memory report and the one change that fits (see README, *Exit codes*).",
        "",
        "Generated by `tests/test_bad_input.py` from the messages observed in its cases; do not edit by hand. Regenerate with",
        "",
        "```bash",
        f"{TABLE_ENV}=docs/errors.md python -m pytest tests/test_bad_input.py",
        "```",
        "",
        "Paths are shown relative to each case's folder (`./model` is a good tiny model, `./adapter` a good adapter for it).",
        "",
        "| case | bad input | command | message |",
        "| --- | --- | --- | --- |",
    ]
    for case, command, changed, message in rows:
        message = re.sub(r"\bpid \d+", "pid N", message)  # the holder's pid differs on every run
        how = f"`{cell(command)}`" + (f" with `{cell(changed)}` in run.yaml" if changed else "")
        lines.append(f"| `{case.id}` | {cell(case.what)} | {how} | {cell(message)} |")
    with atomic_file(path, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_clear_line(case: Case, good_inputs, tmp_path, capsys, observed):
    ws = Workspace(tmp_path, *good_inputs)
    argv = case.build(ws)
    capsys.readouterr()  # whatever building the input printed
    try:
        code = main(argv)
    finally:
        lock = getattr(ws, "held_lock", None)
        if lock is not None:
            lock.release()
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    message = ws.relative(lines[0][len("error: ") :])
    assert case.fragment in message
    assert message.endswith((".", ".)")), message  # one whole sentence
    command = " ".join(["qlora-lite", ws.relative(shlex.join(argv))]).strip()
    observed[case.id] = (case, command, "; ".join(ws.changed), message)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        main(["--debug", "train", str(tmp_path / "nope.yaml")])


def test_docs_table_lists_every_case():
    text = DOCS_TABLE.read_text()
    missing = [c.id for c in CASES if f"| `{c.id}` |" not in text]
    assert not missing, (
        f"docs/errors.md lacks {missing}; regenerate it: {TABLE_ENV}=docs/errors.md python -m pytest tests/test_bad_input.py"
    )
