"""The merged Hugging Face model dir: shards streamed through the merge, index, config.json and tokenizer files
(the adapter's own when it has them: they carry the chat template training used; else the base's).

The base checkpoint is streamed tensor by tensor. Each shard's header is written first (the plan knows every
name, shape and offset) and every tensor is computed, written and dropped before the next one is read:
resident memory stays at about one tensor's working set, whatever the shard size. The output dir appears only
when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import ExportError
from ..io.atomic import atomic_dir, atomic_file, remove_stale_temps, write_json_atomic
from ..io.faults import fault_point
from ..io.lock import DirectoryLock
from ..io.safetensors_writer import write_safetensors_streaming
from .merge import produce_tensor
from .plan import DEFAULT_MAX_SHARD_SIZE, ExportPlan, ExportResult, _check_out_dir, _Item, plan_export

INDEX_NAME = "model.safetensors.index.json"
# Copied from the base, except the tokenizer's (all but generation_config.json), which come from the adapter dir
# when it holds a tokenizer (training saves the one it used there, with its chat template).
AUX_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# The tokenizer's vocabulary files: from the base when the adapter's tokenizer was saved without them (the same
# vocabulary; a sentencepiece tokenizer.model is what converters such as llama.cpp's read).
VOCAB_FILES = ("tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt")


def tokenizer_files_source(base_dir: Path, adapter_dir: Path) -> Path:
    """Where the merged dir's tokenizer files come from: the adapter dir when it holds a tokenizer, else the base."""
    from ..model.loader import TOKENIZER_FILES

    return adapter_dir if any((adapter_dir / name).is_file() for name in TOKENIZER_FILES) else base_dir


def merged_config(config: dict, dtype: torch.dtype) -> dict:
    """config.json for the merged model: no quantization settings, the output dtype named."""
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "_pre_quantization_dtype")}
    name = "float16" if dtype == torch.float16 else "bfloat16"
    out["dtype"] = name
    if "torch_dtype" in out:
        out["torch_dtype"] = name
    return out


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, atomic_file(dst) as fout:
        shutil.copyfileobj(fin, fout, 2**20)


def _write_output(plan: ExportPlan, tmp: Path, device: torch.device) -> None:
    written = 0

    def produce(item: _Item) -> torch.Tensor:
        nonlocal written
        fault_point("in-export", written)  # `written` tensors are already in the output (crash tests)
        written += 1
        return produce_tensor(item, plan, device)

    names = plan.shard_names
    for name, items in zip(names, plan.shards):
        write_safetensors_streaming(tmp / name, items, produce)
    if len(names) > 1:
        weight_map = {item.key: name for name, items in zip(names, plan.shards) for item in items}
        total = sum(item.nbytes for item in plan.items)
        write_json_atomic(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json_atomic(tmp / "config.json", merged_config(plan.config, plan.dtype))
    tokenizer_dir = tokenizer_files_source(plan.base_dir, plan.adapter_dir)
    for aux in AUX_FILES:
        src = plan.base_dir if aux == "generation_config.json" else tokenizer_dir
        if not (src / aux).is_file() and aux in VOCAB_FILES:
            src = plan.base_dir
        if (src / aux).is_file():
            _copy_file(src / aux, tmp / aux)


def run_export(
    base_path: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float16",
    merge_into: str = "dequantized",
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> ExportResult:
    """`export_merged` returning what it wrote (shards, bytes, quantization settings used)."""
    plan = plan_export(
        base_path, adapter_dir, out_dir, dtype, merge_into,
        max_shard_size=max_shard_size, overwrite=overwrite, trust_remote_code=trust_remote_code, revision=revision,
    )  # fmt: skip
    # Quantize where training did (CUDA when present), so the bytes match the trained model's.
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    # One writer per directory, whatever the command: the lock `train` takes on a run dir is this same lock, so
    # an --overwrite of a run that is still training is refused instead of deleting its checkpoints.
    try:
        with DirectoryLock(plan.out_dir, purpose="qlora-lite export"):
            replace = _check_out_dir(plan.out_dir, plan.base_dir, plan.adapter_dir, overwrite)  # again, now held
            remove_stale_temps(plan.out_dir)  # half-written outputs of killed exports
            with torch.no_grad(), atomic_dir(plan.out_dir, overwrite=replace) as tmp:
                _write_output(plan, tmp, device)
    except OSError as exc:
        raise ExportError(
            f"writing the merged model to {plan.out_dir} failed ({exc}); nothing was changed there, "
            "free disk space or fix permissions and export again."
        ) from None
    return ExportResult(
        path=plan.out_dir,
        shard_files=plan.shard_names,
        total_bytes=sum(item.nbytes for item in plan.items),
        merged_tensors=sum(1 for item in plan.items if item.lora is not None),
        dtype=dtype,
        merge_into=merge_into,
        quant=plan.quant,
        quant_recorded=plan.quant_recorded,
    )


def export_merged(
    base_path: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float16",
    merge_into: str = "dequantized",
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Path:
    """Merge a LoRA adapter into its base and write a plain fp16/bf16 Hugging Face model dir; returns its path.

    Each targeted weight becomes `deq(quantize(W)) + scaling·B·A` (merge_into="dequantized": the weights the
    adapter was trained against) or `W + scaling·B·A` (merge_into="original"), computed in fp32 and cast to
    `dtype`. Other tensors are cast and copied. The base is streamed one tensor at a time, the output is
    sharded past `max_shard_size`, and `out_dir` appears only when complete (`overwrite` replaces a non-empty one).
    A hub-id `base_path` resolves through the Hugging Face cache at `revision` (branch, tag or commit; default main).
    """
    return run_export(
        base_path, adapter_dir, out_dir, dtype, merge_into,
        max_shard_size=max_shard_size, overwrite=overwrite, device=device, trust_remote_code=trust_remote_code,
        revision=revision,
    ).path  # fmt: skip


__all__ = ["export_merged", "run_export", "merged_config", "AUX_FILES", "INDEX_NAME"]
