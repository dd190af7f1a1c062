"""Bad-input cases for adapters and exports; appended to `tests/test_bad_input.py`'s table (see bad_input_support)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from qlora_lite.io.lock import DirectoryLock

from .bad_input_support import Case, Workspace


def _config_edit(name: str, edit: Callable[[dict], Any]) -> Callable[[Workspace], list[str]]:
    """Build step: a copy of the good adapter whose adapter_config.json is `edit(config)` (or config edited in place)."""

    def build(ws: Workspace) -> list[str]:
        dst = ws.adapter_copy(name)
        config = json.loads((dst / "adapter_config.json").read_text())
        changed = edit(config)
        (dst / "adapter_config.json").write_text(json.dumps(config if changed is None else changed))
        return ws.export(dst)

    return build


def _set(**changes: Any) -> Callable[[dict], None]:
    return lambda config: config.update(changes)


def _set_quant(**changes: Any) -> Callable[[dict], None]:
    return lambda config: config["qlora_lite"].update(changes)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda config: config.pop(key) and None


def _broken_weights(ws: Workspace) -> list[str]:
    dst = ws.adapter_copy("adapter-garbage")
    (dst / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json and more")
    return ws.export(dst)


def _gguf_of_unsupported_arch(ws: Workspace) -> list[str]:
    """A tiny Phi-3 base with a LoRA adapter for it, exported with --format gguf (llama.cpp has no phi3 here)."""
    from qlora_lite import apply_lora, load_quantized, save_adapter
    from qlora_lite.model.tiny import save_tiny_model

    base = save_tiny_model(ws.root / "phi3", "phi3")
    model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
    apply_lora(model, r=4, alpha=8, seed=0)
    adapter = save_adapter(model, ws.root / "phi3-adapter")
    return ws.export(adapter, base, "--format", "gguf")


def _dora_adapter_saying_plain_lora(ws: Workspace) -> list[str]:
    """A DoRA adapter (magnitude vectors in its weights) whose adapter_config.json says use_dora false."""
    from qlora_lite import apply_lora, load_quantized, save_adapter

    model, _ = load_quantized(ws.model, device="cpu", load_tokenizer=False)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj"], seed=0, use_dora=True)
    adapter = save_adapter(model, ws.root / "adapter-dora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=False)))
    return ws.export(adapter)


def _export_over_live_run(ws: Workspace) -> list[str]:
    """A run dir that a training process holds (its lock, as `train` takes it), exported over with --overwrite."""
    run = ws.root / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    ws.write("run/metrics.jsonl", '{"step": 2, "loss": 4.0}\n')
    ws.held_lock = DirectoryLock(run, purpose="qlora-lite train").acquire()
    return ["export", "--base", str(ws.model), "--adapter", str(ws.adapter), "--out", str(run), "--overwrite"]


CASES: list[Case] = [
    Case(
        "adapter-config-not-an-object",
        "an adapter_config.json whose top level is a list",
        _config_edit("adapter-list", lambda config: [config]),
        "./adapter-list/adapter_config.json holds a list where an adapter config must be a JSON object; "
        "re-save the adapter with peft or qlora-lite.",
    ),
    Case(
        "adapter-r-not-a-number",
        'an adapter_config.json with r written as a string ("4")',
        _config_edit("adapter-r", _set(r="4")),
        './adapter-r/adapter_config.json: "r" is "4" (a string) but must be a positive whole number such as 8 or 16; '
        "fix it or re-save the adapter with peft or qlora-lite.",
    ),
    Case(
        "adapter-target-modules-a-number",
        "an adapter_config.json with target_modules a number",
        _config_edit("adapter-targets", _set(target_modules=7)),
        './adapter-targets/adapter_config.json: "target_modules" is 7 (a whole number) but must be a list of module '
        'names or a regex string such as "all-linear"',
    ),
    Case(
        "adapter-lora-alpha-missing",
        "an adapter_config.json without lora_alpha",
        _config_edit("adapter-alpha", _drop("lora_alpha")),
        "./adapter-alpha/adapter_config.json lacks 'lora_alpha'; re-save the adapter with peft or qlora-lite.",
    ),
    Case(
        "adapter-dropout-out-of-range",
        "an adapter_config.json with lora_dropout 1.5",
        _config_edit("adapter-dropout", _set(lora_dropout=1.5)),
        './adapter-dropout/adapter_config.json: "lora_dropout" is 1.5 (a number) but must be a number in [0, 1)',
    ),
    Case(
        "adapter-quant-record-not-an-object",
        'an adapter_config.json whose "qlora_lite" record is a string',
        _config_edit("adapter-record", _set(qlora_lite="nf4")),
        './adapter-record/adapter_config.json: "qlora_lite" is "nf4" (a string) but must be an object',
    ),
    Case(
        "adapter-quant-bits-a-string",
        'a "qlora_lite" record with bits written as a string ("8")',
        _config_edit("adapter-bits", _set_quant(bits="8")),
        './adapter-bits/adapter_config.json: "qlora_lite.bits" is "8" (a string) but must be a whole number (4 or 8); '
        "fix it or re-save the adapter with peft or qlora-lite.",
    ),
    Case(
        "adapter-quant-bits-unsupported",
        'a "qlora_lite" record with bits 5',
        _config_edit("adapter-bits5", _set_quant(bits=5)),
        "./adapter-bits5/adapter_config.json records invalid quantization settings (qlora_lite.bits is 5; use 4 or 8); "
        "re-save the adapter.",
    ),
    Case(
        "adapter-rank-differs-from-config",
        "an adapter whose tensors have rank 4 while adapter_config.json says r 8",
        _config_edit("adapter-rank", _set(r=8)),
        "layers.0.mlp.down_proj.lora_A.weight' has rank 4 (shape [4, 192]) but ./adapter-rank/adapter_config.json says r is 8; "
        "the weights and the config belong to different adapters, re-save the adapter.",
    ),
    Case(
        "adapter-use-dora-without-magnitudes",
        "an adapter_config.json with use_dora true over plain LoRA weights (no lora_magnitude_vector)",
        _config_edit("adapter-nodora", _set(use_dora=True)),
        "./adapter-nodora/adapter_config.json has use_dora true but the adapter has no "
        "model.layers.0.mlp.down_proj.lora_magnitude_vector beside its LoRA matrices; re-save the adapter.",
    ),
    Case(
        "adapter-magnitudes-without-use-dora",
        "a DoRA adapter (lora_magnitude_vector tensors) whose adapter_config.json says use_dora false",
        _dora_adapter_saying_plain_lora,
        "is a DoRA magnitude, but ./adapter-dora/adapter_config.json has use_dora false; set use_dora to true if the "
        "adapter was trained with DoRA, or re-save the adapter.",
    ),
    Case(
        "adapter-weights-not-safetensors",
        "an adapter_model.safetensors that is not a safetensors file",
        _broken_weights,
        "./adapter-garbage/adapter_model.safetensors is not a readable safetensors file (",
    ),
    Case(
        "adapter-path-is-a-file",
        "an adapter path that is a file",
        lambda ws: ws.export(ws.write("adapter.json", "{}")),
        "adapter path ./adapter.json is a file; give the adapter/ folder of a run (or a peft adapter dir).",
    ),
    Case(
        "gguf-unsupported-architecture",
        "export --format gguf of a model family the GGUF export does not write (Phi-3)",
        _gguf_of_unsupported_arch,
        "./phi3 is a phi3 model, which the GGUF export does not support (llama, mistral, qwen2, gemma, gemma2); "
        "export with --format hf instead.",
    ),
    Case(
        "gguf-unsupported-type",
        "export --format gguf with a --gguf-type it cannot write (q5_k)",
        lambda ws: ws.export(None, None, "--format", "gguf", "--gguf-type", "q5_k"),
        "GGUF type 'q5_k' is not supported; use f16, bf16, q8_0 or q4_0 (for k-quants run llama.cpp's "
        "llama-quantize on an f16 export).",
    ),
    Case(
        "export-over-a-training-run",
        "export --overwrite onto a run dir that a training run is writing",
        _export_over_live_run,
        "./run is in use by pid",
    ),
    Case(
        "train-into-a-users-folder",
        "a training output_dir that already holds someone's files",
        lambda ws: ws.train(output_dir=str(ws.write("mine/thesis.tex", "keep").parent)),
        "./mine is not empty and is not a qlora-lite run directory; choose an empty or new output_dir.",
    ),
    Case(
        "train-output-dir-is-a-file",
        "a training output_dir that is a file",
        lambda ws: ws.train(output_dir=str(ws.write("notes.txt", "keep"))),
        "output_dir ./notes.txt is a file; choose an empty or new output_dir.",
    ),
]
