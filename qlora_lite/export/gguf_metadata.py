"""What llama.cpp needs to know about a model: the families it runs (`FAMILIES`: how each transformers model_type
maps to a llama.cpp architecture and its conventions) and the hyperparameter keys of the GGUF header.

Anything llama.cpp would run differently from transformers (another activation, biases it does not load, a rope
scaling it does not implement, Gemma 2's query scale or layer pattern other than its own) is refused with one
`ExportError` before anything is written. Keys and conventions follow llama.cpp's `convert_hf_to_gguf.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ExportError


@dataclass(frozen=True)
class Family:
    """How llama.cpp runs one transformers model_type."""

    arch: str  # gguf's MODEL_ARCH name
    permute_qk: bool = False  # llama.cpp's rotary layout interleaves halves: q/k rows permuted (LlamaModel.permute)
    norm_offset: float = 0.0  # Gemma stores RMSNorm weights as w - 1
    tied_head: bool = False  # llama.cpp always uses token_embd as the output head
    biases: tuple[str, ...] = ()  # llama.cpp tensors whose bias it loads
    act: tuple[str, ...] = ("silu",)


FAMILIES = {
    "llama": Family("llama", permute_qk=True, biases=("attn_q", "attn_k", "attn_v", "attn_output")),
    "mistral": Family("llama", permute_qk=True, biases=("attn_q", "attn_k", "attn_v", "attn_output")),
    "qwen2": Family("qwen2", biases=("attn_q", "attn_k", "attn_v")),
    "gemma": Family("gemma", norm_offset=1.0, tied_head=True, act=("gelu", "gelu_pytorch_tanh")),
    "gemma2": Family("gemma2", norm_offset=1.0, tied_head=True, act=("gelu", "gelu_pytorch_tanh")),
}


def family_of(config: dict, base_dir: Path) -> Family:
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ExportError(
            f"{base_dir} is a {model_type or 'model without model_type'} model, which the GGUF export does not "
            "support (llama, mistral, qwen2, gemma, gemma2); export with --format hf instead."
        )
    return family


def _need(config: dict, key: str, base_dir: Path):
    value = config.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ExportError(f"{base_dir}/config.json has no usable {key!r} ({value!r}), which llama.cpp needs.")
    return value


def refuse(base_dir: Path, what: str) -> ExportError:
    return ExportError(f"{base_dir} {what}, which llama.cpp would run differently; export with --format hf instead.")


def _rope(config: dict) -> tuple[float, dict]:
    """(rope theta, rope scaling parameters) from a transformers 4 (rope_theta/rope_scaling) or 5 (rope_parameters)
    config.json."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = config.get("rope_theta") or params.get("rope_theta") or 10000.0
    return float(theta), scaling


def write_hyperparameters(
    writer, gguf, config: dict, family: Family, base_dir: Path, vocab_rows: int
) -> torch.Tensor | None:
    """Write the model's hyperparameter keys; returns llama.cpp's rope_freqs for Llama 3 rope scaling (else None)."""
    heads = _need(config, "num_attention_heads", base_dir)
    hidden = _need(config, "hidden_size", base_dir)
    head_dim = config.get("head_dim") or hidden // heads
    act = config.get("hidden_activation") or config.get("hidden_act")
    if act not in family.act:
        raise refuse(base_dir, f"uses the {act} activation")
    if config.get("mlp_bias") or (config.get("attention_bias") and not family.biases):
        raise refuse(base_dir, "has biases in its attention or MLP layers")
    if config.get("use_sliding_window"):
        raise refuse(base_dir, "uses sliding-window attention")
    writer.add_context_length(int(_need(config, "max_position_embeddings", base_dir)))
    writer.add_embedding_length(int(hidden))
    writer.add_block_count(int(_need(config, "num_hidden_layers", base_dir)))
    writer.add_feed_forward_length(int(_need(config, "intermediate_size", base_dir)))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(_need(config, "rms_norm_eps", base_dir)))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_vocab_size(vocab_rows)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if family.arch == "llama":
        writer.add_rope_dimension_count(int(head_dim))
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    rope_freqs = None
    if kind == "linear" and family.arch in ("llama", "qwen2"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn" and family.arch in ("llama", "qwen2"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        original = scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings")
        writer.add_rope_scaling_orig_ctx_len(int(original))
    elif kind == "llama3" and family.arch == "llama":
        rope_freqs = _llama3_rope_factors(scaling, theta, int(head_dim))
    elif kind != "default":
        raise refuse(base_dir, f"uses {kind} rope scaling")
    if family.arch == "gemma2":
        layers = int(config["num_hidden_layers"])
        # llama.cpp scales Gemma 2's queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 46-layer 27B
        expected = hidden // heads if layers == 46 else head_dim
        if config.get("query_pre_attn_scalar", expected) != expected:
            raise refuse(base_dir, f"scales queries by query_pre_attn_scalar {config['query_pre_attn_scalar']}")
        pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        if config.get("layer_types", pattern) != pattern:
            raise refuse(base_dir, "does not alternate sliding and full attention layers as Gemma 2 does")
        if config.get("attn_logit_softcapping"):
            writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        writer.add_sliding_window(int(config.get("sliding_window") or 4096))
    return rope_freqs


def _llama3_rope_factors(scaling: dict, theta: float, dim: int) -> torch.Tensor:
    """Llama 3.1's per-frequency rope factors, as convert_hf_to_gguf computes them (rope_freqs.weight)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


__all__ = ["Family", "FAMILIES", "family_of", "write_hyperparameters", "refuse"]
