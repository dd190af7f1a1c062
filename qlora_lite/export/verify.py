"""Check a merged export against the quantized base + adapter it came from, on a fixed batch.

The reference is the model training ran: `load_quantized` with the adapter's recorded quantization and the
adapter loaded on top. The merged model is loaded by plain transformers in its stored dtype.

With compute_dtype "float32" (the default) both run in fp32: the merged weights keep their fp16/bf16 values,
the reference's quantized weights are dequantized exactly as in training (8-bit layers become plain linears
over their dequantized weight, since LLM.int8's activation quantization is not part of any merged model), and
the reference's other tensors
(embeddings, norms, biases, lm_head), which the loader keeps in bf16, are read again at the checkpoint's own
precision, as the export writes them. The difference then measures the merge and its output rounding, not
bf16 activation or embedding rounding (which alone move the tiny test models' logits by about 1%).
With "native" the reference is the training-time model as is (bf16) and the merged model runs in its dtype.
The two models are run one after the other, so only one of them is in memory at a time.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ExportError

COMPUTE_DTYPES = ("float32", "native")
# Largest per-token relative logit difference accepted for a merge into the dequantized weights.
VERIFY_TOLERANCE = 1e-2


@dataclass(frozen=True)
class VerifyResult:
    """Per-token relative logit differences ||merged - reference|| / ||reference|| over the fixed batch."""

    max_rel: float
    mean_rel: float
    tokens: int
    dtype: str
    compute_dtype: str


def fixed_batch(vocab_size: int, batch_size: int = 2, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids [batch_size, seq_len] below `vocab_size`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)


def _compute_in_fp32(model: torch.nn.Module) -> None:
    from ..model.quant import bnb, dequantize_module

    model.float()  # packed 4-bit / int8 weights are not floating point and stay as they are
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32  # dequantizes to bf16 as in training, then upcasts
        elif isinstance(module, bnb.nn.Linear8bitLt):
            # LLM.int8 also quantizes the activations, which no merged model reproduces; compare the weights
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = dequantize_module(module)
            if module.bias is not None:
                linear.bias.data = module.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear.to(module.weight.device))


def _restore_checkpoint_precision(model: torch.nn.Module, base_path: str | Path) -> None:
    """Overwrite the model's floating-point (non-quantized) tensors with the checkpoint's values, one at a time.

    A resized embedding or head (new token rows) gets the checkpoint's rows back; its added rows stay as they are.
    """
    from ..io.safetensors import SafetensorsFile, weight_files
    from ..model.embeddings import TrainableTokens

    params = dict(model.named_parameters(remove_duplicate=False))
    for name, module in model.named_modules():  # rows-trained layers hold the base's rows in their base_layer
        if isinstance(module, TrainableTokens):
            params[f"{name}.weight"] = module.base_layer.weight
    prefix = getattr(model, "base_model_prefix", "")
    for path in weight_files(Path(base_path)):
        shard = SafetensorsFile(path)
        for key in shard.keys():
            name = next((n for n in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if n in params), None)
            param, shape = params.get(name) if name else None, shard.shape(key)
            if param is None or not param.is_floating_point() or param.dim() != len(shape):
                continue  # packed 4-bit / int8 weights, and buffers the model computes itself
            grown = bool(shape) and param.shape[0] >= shape[0] and tuple(param.shape[1:]) == shape[1:]
            if tuple(param.shape) != shape and not grown:
                continue
            with torch.no_grad():
                (param[: shape[0]] if shape else param).copy_(shard.read(key, param.dtype))


def reference_logits(
    base_path: str | Path,
    adapter_dir: str | Path,
    input_ids: torch.Tensor,
    device: str | torch.device | None = None,
    compute_dtype: str = "float32",
) -> torch.Tensor:
    """Logits (as fp32) of the quantized base + adapter, quantized as recorded in the adapter, in eval mode."""
    from .adapter_load import load_base_with_adapter

    model, _ = load_base_with_adapter(base_path, adapter_dir, device)
    if compute_dtype == "float32":
        _compute_in_fp32(model)
        _restore_checkpoint_precision(model, base_path)
    # Inference, as the merged model runs: LoRA dropout (0.05 in the shipped example) would otherwise drop a
    # random part of the adapter's input and fail a correct merge.
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(next(model.parameters()).device)).logits.float().cpu()
    del model
    gc.collect()
    return logits


def merged_logits(
    merged_dir: str | Path,
    input_ids: torch.Tensor,
    device: str | torch.device | None = None,
    compute_dtype: str = "float32",
) -> tuple[torch.Tensor, str]:
    """Logits (as fp32) of the merged model loaded by plain transformers (eval mode), and its stored dtype."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto")
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"transformers cannot load the merged model in {merged_dir} ({str(exc).splitlines()[0][:160]}); re-run the export."
        ) from None
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if compute_dtype == "float32":
        model.float()
    model.to(device or "cpu").eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device or "cpu")).logits.float().cpu()
    del model
    gc.collect()
    return logits, dtype


def compare_logits(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(largest, mean) over tokens of ||actual - expected|| / ||expected||, in float64."""
    a, e = actual.double().flatten(0, -2), expected.double().flatten(0, -2)
    rel = (a - e).norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-30)
    return rel.max().item(), rel.mean().item()


def verify_merged(
    merged_dir: str | Path,
    base_path: str | Path,
    adapter_dir: str | Path,
    *,
    batch_size: int = 2,
    seq_len: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    compute_dtype: str = "float32",
) -> VerifyResult:
    """Run a fixed batch through the merged model and through the quantized base + adapter; return the differences.

    `compute_dtype` "float32" computes both models in fp32 (needs 4 bytes per merged parameter); "native" runs
    the reference in bf16 as in training and the merged model in its stored dtype, as users will.
    """
    import json

    if compute_dtype not in COMPUTE_DTYPES:
        raise ExportError(f"verify compute dtype {compute_dtype!r} is unknown; use 'float32' or 'native'.")
    vocab = int(json.loads((Path(merged_dir) / "config.json").read_text()).get("vocab_size") or 256)
    input_ids = fixed_batch(vocab, batch_size, seq_len, seed)
    expected = reference_logits(base_path, adapter_dir, input_ids, device, compute_dtype)
    actual, dtype = merged_logits(merged_dir, input_ids, device, compute_dtype)
    largest, mean = compare_logits(actual, expected)
    return VerifyResult(
        max_rel=largest, mean_rel=mean, tokens=input_ids.numel(), dtype=dtype, compute_dtype=compute_dtype
    )


__all__ = [
    "VERIFY_TOLERANCE",
    "VerifyResult",
    "verify_merged",
    "reference_logits",
    "merged_logits",
    "compare_logits",
    "fixed_batch",
]
