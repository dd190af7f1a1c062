"""The merged model as one GGUF file for llama.cpp and Ollama, with an Ollama `Modelfile` beside it.

`run_gguf_export` plans exactly as the safetensors export does (`plan.plan_export`: every input checked from
headers), then checks what llama.cpp needs before anything is written: a family it runs (Llama, Mistral, Qwen2,
Gemma, Gemma 2), hyperparameters it reproduces, every tensor under one of its names (gguf's own `TensorNameMap`
and `MODEL_TENSORS` tables), a tokenizer it can rebuild (`gguf_tokenizer`). The GGUF header (metadata and every
tensor's name, shape and type) is written first, then each tensor is produced by the same merge code as the
safetensors export, converted to llama.cpp's layout and type, written and dropped before the next: memory stays at
one tensor plus its quantized copy. Conventions follow llama.cpp's `convert_hf_to_gguf.py`: Llama/Mistral q/k
rows permuted for its rotary layout, Gemma's norms stored as w - 1 written as w, 1-D tensors in F32, no
`output.weight` for tied embeddings, Q8_0/Q4_0 rows that are not whole blocks left in F16. The output dir (the
.gguf and the Modelfile) appears only when complete, like the safetensors export.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from ..io.atomic import atomic_dir, remove_stale_temps, write_text_atomic
from ..io.lock import DirectoryLock
from .gguf_metadata import Family, family_of, refuse, write_hyperparameters
from .hf_dir import tokenizer_files_source
from .merge import CHUNK_ELEMENTS, produce_tensor
from .plan import ExportPlan, _check_out_dir, _Item, plan_export

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")
DEFAULT_GGUF_TYPE = "q8_0"
MODELFILE = "Modelfile"


@dataclass
class _Tensor:
    """One GGUF tensor: llama.cpp's name, numpy-order shape and type, and where its values come from."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    item: _Item | None = None
    heads: int = 0  # > 0: rows permuted for llama.cpp's rotary layout with this many heads
    offset: float = 0.0
    values: torch.Tensor | None = None  # a tensor computed here (rope_freqs)


@dataclass(frozen=True)
class GgufResult:
    """What a GGUF export wrote."""

    path: Path  # the .gguf file
    modelfile: Path
    model_name: str
    arch: str
    gguf_type: str
    tensors: int
    merged_tensors: int
    total_bytes: int
    template_translated: bool


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError(
            "--format gguf needs the gguf package, which is not installed; run pip install 'qlora-lite[gguf]'."
        ) from None
    return gguf


def check_gguf_type(gguf_type: object) -> str:
    if gguf_type not in GGUF_TYPES:
        raise ExportError(
            f"GGUF type {gguf_type!r} is not supported; use f16, bf16, q8_0 or q4_0 (for k-quants run llama.cpp's "
            "llama-quantize on an f16 export)."
        )
    return str(gguf_type)


def _tensor_type(gguf, name: str, shape: tuple[int, ...], gguf_type: str, head: str, dtype: torch.dtype):
    q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return q.F32
    chosen = {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[gguf_type]
    if chosen == q.Q4_0 and name == head:
        chosen = q.Q8_0  # the output head is the most sensitive weight (llama-quantize keeps it in a higher type)
    if chosen in (q.Q8_0, q.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[chosen][0]:
        chosen = q.F16 if dtype == torch.float16 else q.BF16  # rows that are not whole blocks, as convert does
    return chosen


def _tensors(gguf, plan: ExportPlan, family: Family, gguf_type: str) -> list[_Tensor]:
    """Each checkpoint tensor under llama.cpp's name and type; refuses a tensor llama.cpp would not load."""
    config = plan.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.arch)
    layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(arch, layers)
    allowed = set(gguf.MODEL_TENSORS[arch])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    tied = family.tied_head or not any(
        names.get_name(i.key, try_suffixes=(".weight",)) == "output.weight" for i in plan.items
    )
    if family.tied_head and config.get("tie_word_embeddings") is False:
        raise refuse(plan.base_dir, "has an output head of its own, while llama.cpp's Gemma uses the embedding")
    head = "token_embd.weight" if tied else "output.weight"
    out = []
    for item in plan.items:
        if item.key.endswith("rotary_emb.inv_freq") or (family.tied_head and item.key.endswith("lm_head.weight")):
            continue  # rotary buffers llama.cpp computes itself; a tied head that a checkpoint stores anyway
        found = names.get_type_and_name(item.key, try_suffixes=(".weight", ".bias"))
        kind = found and gguf.TENSOR_NAMES[found[0]].split(".")[-1]
        if found is None or found[0] not in allowed or (found[1].endswith(".bias") and kind not in family.biases):
            raise refuse(
                plan.base_dir, f"holds the tensor {item.key!r}, which llama.cpp's {family.arch} has no place for"
            )
        name = found[1]
        if len(item.shape) < 2 and item.dtype.is_floating_point:
            item.dtype = torch.float32  # 1-D tensors stay F32: read at the checkpoint's precision, not rounded
        tensor = _Tensor(
            name, tuple(item.shape), _tensor_type(gguf, name, item.shape, gguf_type, head, plan.dtype), item
        )
        if family.permute_qk and kind in ("attn_q", "attn_k"):
            tensor.heads = heads if kind == "attn_q" else kv_heads
        if family.norm_offset and name.endswith("norm.weight"):
            tensor.offset = family.norm_offset
        out.append(tensor)
    return out


def permute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's `LlamaModel.permute`: each head's rows from HF's half-split rotary layout to llama.cpp's
    interleaved one (weights [rows, cols] or biases [rows])."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(gguf, values: torch.Tensor, qtype) -> np.ndarray:
    """The tensor's bytes in `qtype`: quantized a block of rows at a time, so temporaries stay small."""
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return values.float().contiguous().numpy()
    if qtype == q.F16:
        return values.to(torch.float16).contiguous().numpy()
    if qtype == q.BF16:
        return values.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    rows, cols = values.shape
    out = np.empty(gguf.quants.quant_shape_to_byte_shape((rows, cols), qtype), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // 4 // max(cols, 1))
    for start in range(0, rows, step):
        out[start : start + step] = gguf.quants.quantize(values[start : start + step].float().numpy(), qtype)
    return out


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size if shape else size


def _writer_class(gguf):
    class Writer(gguf.GGUFWriter):
        """gguf's writer, also writing an empty array (a BPE vocabulary without merges still needs the key)."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def model_name(out_dir: Path) -> str:
    """An Ollama model name from the output dir's name (lower case letters, digits, '.', '_', '-')."""
    return re.sub(r"[^a-z0-9._-]+", "-", out_dir.resolve().name.lower()).strip("-._") or "model"


def _modelfile(vocab, name: str, gguf_name: str, tokenizer) -> tuple[str, bool]:
    """(Modelfile text, whether the chat template was translated); sets vocab's eot id from the assistant turn's end."""
    from .modelfile import infer_chat_format, modelfile_text

    template = vocab.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        return modelfile_text(gguf_name, name, None, "the tokenizer has no chat template", []), False

    def render(messages, generation):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation, chat_template=template
        )

    fmt, why = infer_chat_format(render, tokenizer.bos_token if vocab.add_bos else None)
    end = fmt.suffix["assistant"].strip() if fmt is not None else ""
    if end in vocab.token_texts and vocab.token_texts[end] != vocab.special_ids.get("eos"):
        vocab.special_ids["eot"] = vocab.token_texts[end]  # llama.cpp ends a turn there, whatever the token's text
    eos = tokenizer.eos_token if "eos" in vocab.special_ids else None
    return modelfile_text(gguf_name, name, fmt, why, [eos] if eos else []), fmt is not None


def run_gguf_export(
    base_path: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    gguf_type: str = DEFAULT_GGUF_TYPE,
    dtype: str = "float16",
    merge_into: str = "dequantized",
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> GgufResult:
    """Merge an adapter into its base and write `out_dir/NAME.gguf` plus an Ollama `out_dir/Modelfile`.

    `gguf_type`: f16 and bf16 hold the merged weights exactly as the safetensors export does in that dtype; q8_0
    and q4_0 quantize the merged weights (merged in `dtype`). Raises `ExportError`, before anything is written, for
    an architecture, tensor, hyperparameter or tokenizer llama.cpp cannot take.
    """
    from .gguf_tokenizer import add_vocab, load_tokenizer, read_vocab

    gguf_type = check_gguf_type(gguf_type)
    gguf = _gguf()
    dtype = {"f16": "float16", "bf16": "bfloat16"}.get(gguf_type, dtype)
    plan = plan_export(
        base_path, adapter_dir, out_dir, dtype, merge_into,
        overwrite=overwrite, trust_remote_code=trust_remote_code, revision=revision,
    )  # fmt: skip
    family = family_of(plan.config, plan.base_dir)
    tensors = _tensors(gguf, plan, family, gguf_type)
    vocab_rows = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    name = model_name(plan.out_dir)
    writer = _writer_class(gguf)(path=None, arch=family.arch)
    writer.add_name(name)
    rope_freqs = write_hyperparameters(writer, gguf, plan.config, family, plan.base_dir, vocab_rows)
    if rope_freqs is not None:
        tensors.insert(
            0, _Tensor("rope_freqs.weight", tuple(rope_freqs.shape), gguf.GGMLQuantizationType.F32, values=rope_freqs)
        )
    ftype = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[gguf_type]
    writer.add_file_type(getattr(gguf.LlamaFileType, ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_dir = tokenizer_files_source(plan.base_dir, plan.adapter_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = read_vocab(tokenizer_dir, vocab_rows, plan.config, tokenizer)
    gguf_name = f"{name}.gguf"
    modelfile, translated = _modelfile(vocab, name, gguf_name, tokenizer)
    add_vocab(writer, vocab)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.float32, _nbytes(gguf, t.shape, t.qtype), raw_dtype=t.qtype)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    try:
        with DirectoryLock(plan.out_dir, purpose="qlora-lite export"):
            replace = _check_out_dir(plan.out_dir, plan.base_dir, plan.adapter_dir, overwrite)  # again, now held
            remove_stale_temps(plan.out_dir)
            with torch.no_grad(), atomic_dir(plan.out_dir, overwrite=replace) as tmp:
                _write(gguf, writer, tmp / gguf_name, tensors, plan, device)
                write_text_atomic(tmp / MODELFILE, modelfile)
    except ExportError as exc:
        if gguf_type != "f16":
            raise
        # the merge's float16 range check names --dtype; for f16 the GGUF type decides the dtype
        raise ExportError(str(exc).replace("(--dtype bfloat16)", "(--gguf-type bf16)")) from None
    except OSError as exc:
        raise ExportError(
            f"writing the GGUF export to {plan.out_dir} failed ({exc}); nothing was changed there, "
            "free disk space or fix permissions and export again."
        ) from None
    path = plan.out_dir / gguf_name
    return GgufResult(
        path=path,
        modelfile=plan.out_dir / MODELFILE,
        model_name=name,
        arch=family.arch,
        gguf_type=gguf_type,
        tensors=len(tensors),
        merged_tensors=sum(1 for t in tensors if t.item is not None and t.item.lora is not None),
        total_bytes=path.stat().st_size,
        template_translated=translated,
    )


def _write(gguf, writer, path: Path, tensors: list[_Tensor], plan: ExportPlan, device: torch.device) -> None:
    """Header, metadata and tensor infos first, then each tensor produced, converted, written and dropped."""
    writer.open_output_file(path)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            values = t.values if t.item is None else produce_tensor(t.item, plan, device)
            if t.heads:
                values = permute_for_rope(values, t.heads)
            if t.offset:
                values = values.float() + t.offset
            data = _encode(gguf, values, t.qtype)
            del values
            writer.write_tensor_data(data)
            del data
        writer.flush()
    finally:
        writer.close()


__all__ = ["run_gguf_export", "GgufResult", "GGUF_TYPES", "DEFAULT_GGUF_TYPE", "permute_for_rope", "model_name"]
