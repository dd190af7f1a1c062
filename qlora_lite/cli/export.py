"""`qlora-lite export`: merge an adapter into its base and write a plain Hugging Face model dir, or one GGUF
file with an Ollama Modelfile (`--format gguf`)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import console


def add_parser(sub: Any) -> None:
    """Register `export` and its flags."""
    p = sub.add_parser(
        "export",
        help="merge an adapter into the base and write fp16/bf16 weights (or a GGUF file)",
        description="Merge a LoRA adapter into its base model and write a plain fp16/bf16 Hugging Face model dir "
        "(or, with --format gguf, one GGUF file for llama.cpp and an Ollama Modelfile), streaming the base one "
        "tensor at a time.",
    )
    p.add_argument("--base", required=True, help="base model directory or hub id (Org/Name, from the HF cache)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub-id --base (default: main)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument(
        "--format",
        default="hf",
        choices=["hf", "gguf"],
        help="hf (default): a Hugging Face model dir (safetensors); gguf: OUT/NAME.gguf for llama.cpp and an "
        "Ollama OUT/Modelfile, NAME being OUT's name (Llama, Mistral, Qwen2, Gemma, Gemma 2)",
    )
    p.add_argument(
        "--gguf-type",
        default=None,
        help="weights of a --format gguf export: f16, bf16, q8_0 (default) or q4_0; q8_0 and q4_0 quantize the "
        "weights merged in --dtype",
    )
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument(
        "--merge-into",
        default="dequantized",
        choices=["dequantized", "original"],
        help="dequantized (default): the quantized weights the adapter was trained against, same behaviour as in "
        "training; original: the checkpoint's full-precision weights (the adapter may drift, check with --verify)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--verify", action="store_true", help="compare the merged model's logits with base + adapter")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the base directory (config.json auto_map); only for code you trust",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """Merge and write; with --verify compare logits (exit 1 when the merge is off)."""
    from ..export.hf_dir import run_export
    from ..model.loader import check_model_dir

    out = console()

    def say(text: str) -> None:
        out.print(text, soft_wrap=True, markup=False)  # paths are neither wrapped nor read as markup

    if args.format == "gguf":
        return _run_gguf(args, say)
    if args.gguf_type is not None:
        from ..errors import UsageError

        raise UsageError("--gguf-type applies to --format gguf only; add --format gguf or drop --gguf-type.")
    base = check_model_dir(args.base, args.revision)  # once: the merge and --verify read the same snapshot
    result = run_export(
        base, args.adapter, args.out, args.dtype, args.merge_into,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    say(
        f"merged {result.merged_tensors} LoRA weights into the {result.merge_into} base: {result.path} "
        f"({result.dtype}, {len(result.shard_files)} shard(s), {result.total_bytes / 2**20:.1f} MiB)"
    )
    if result.merge_into == "dequantized":
        q = result.quant
        kind = (
            "8-bit LLM.int8"
            if q.bits == 8
            else f"4-bit {q.quant_type}, double quant {q.double_quant}, blocksize {q.blocksize}"
        )
        origin = (
            "recorded in the adapter"
            if result.quant_recorded
            else "not recorded in the adapter, assumed the QLoRA defaults"
        )
        say(f"quantization: {kind} ({origin})")
    if not args.verify:
        return 0
    from ..export.verify import VERIFY_TOLERANCE, verify_merged

    check = verify_merged(result.path, base, args.adapter)
    say(
        f"verify: largest relative logit difference {check.max_rel:.2e}, mean {check.mean_rel:.2e} over {check.tokens} tokens "
        f"(merged {check.dtype} vs quantized base + adapter, {check.compute_dtype} compute)"
    )
    if check.max_rel < VERIFY_TOLERANCE:
        return 0
    if result.merge_into == "original":
        say(
            "note: merging into the original weights removes the quantization error the adapter was trained with, so larger differences are expected."
        )
        return 0
    console(stderr=True).print(
        f"[bold red]verify failed:[/] largest difference {check.max_rel:.2e} is above {VERIFY_TOLERANCE:g}.",
        soft_wrap=True,
    )
    return 1


def _run_gguf(args: argparse.Namespace, say) -> int:
    """--format gguf: one GGUF file and an Ollama Modelfile."""
    from ..errors import UsageError
    from ..export.gguf import DEFAULT_GGUF_TYPE, run_gguf_export

    if args.verify:
        raise UsageError("--verify compares a Hugging Face export's logits; drop --verify with --format gguf.")
    result = run_gguf_export(
        args.base, args.adapter, args.out, args.gguf_type or DEFAULT_GGUF_TYPE, args.dtype, args.merge_into,
        overwrite=args.overwrite, trust_remote_code=args.trust_remote_code, revision=args.revision,
    )  # fmt: skip
    say(
        f"merged {result.merged_tensors} LoRA weights into the {args.merge_into} base: {result.path} "
        f"({result.arch}, {result.gguf_type}, {result.tensors} tensors, {result.total_bytes / 2**20:.1f} MiB)"
    )
    if not result.template_translated:
        say(f"note: the chat template was not translated for Ollama; {result.modelfile} says why.")
    say(f"ollama: ollama create {result.model_name} -f {result.modelfile}")
    return 0
