"""The memory-budget model: bytes per component for a QLoRA run, the peak, and whether it fits a budget.

Weights, adapters, gradients and optimizer state are counted exactly from the model skeleton (built on the
meta device from the config, so every architecture transformers knows works) and bitsandbytes' storage
layout; tests check them byte for byte against real tensors. Activations, logits and temporaries follow
the autograd saved-tensor rules of the code that runs (transformers' decoder layers, our LoRA layer,
bitsandbytes' matmul functions), in the style of Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (per-layer bytes per token), adapted to RMSNorm, SwiGLU/GeGLU,
grouped-query attention with a fused (flash) kernel, bf16 and LoRA; tests check the stored activations
byte for byte on the CPU with `memory_probe.AllocationTracker`.

A training step goes through four phases; the peak is the largest of them:
  forward      persistent + stored activations so far + one layer's forward temporaries
  loss         persistent + stored activations + the logits / log-softmax tensors of the loss
  backward     persistent + stored activations + one layer recomputed (with checkpointing) + its gradients
               + the adapters' bf16 gradients
  optimizer    persistent + the fp32 accumulated gradients + optimizer temporaries
Persistent: weights, buffers, adapters, optimizer state, and (with grad_accum > 1) the fp32 gradients that
`AdapterOptimizer.accumulate_grads` keeps between micro-batches.
CUDA adds the caching allocator's reserve (blocks freed by one phase that the next cannot reuse), cuBLAS
workspaces, and the CUDA context (outside torch's allocator).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelLoadError
from .settings import RunSettings, make_settings
from ..model.quant import weight_bytes_4bit, weight_bytes_8bit

MiB = 1 << 20
GiB = 1 << 30
PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"

BF16 = 2  # bytes per bf16 element (weights that stay unquantized, adapters, their gradients, activations)
FP32 = 4  # bytes per fp32 element
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes Optimizer2State(min_8bit_size=4096): smaller tensors keep fp32 state
BNB_STATE_BLOCK = 256  # bitsandbytes 8-bit optimizers quantize state1/state2 blockwise, 256 values per fp32 absmax
BNB_PAGED_MIN_NUMEL = 100_000  # bitsandbytes Optimizer8bit.get_state_buffer pages only tensors with numel >= 1e5
CUBLAS_WORKSPACE = 32 * MiB  # torch's default cuBLAS workspace on sm90 (CUBLAS_WORKSPACE_CONFIG=:4096:8), per handle
ALLOCATOR_SLACK = 0.03  # caching-allocator rounding/splitting on top of the phase model (uncalibrated guess, see docs)

# ------------------------------------------------------------------------------------------- config


def preset_names() -> list[str]:
    """Names of the shipped architecture presets (config.json numbers, no weights)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _config_from_dict(data: dict, where: str):
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"{where} has no model_type; give a Hugging Face config.json (it names the architecture).")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{where} declares model_type {model_type!r}, which transformers cannot build ({str(exc).splitlines()[0][:120]}).") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} cannot be read as JSON ({exc}); give a valid config.json.") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object; give a Hugging Face config.json.")
    return data


def resolve_config(config_or_path: Any) -> tuple[Any, str]:
    """(transformers config, display name) from a model dir, a config.json path, a config, a dict or a preset name."""
    from transformers import PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path, getattr(config_or_path, "name_or_path", "") or config_or_path.model_type
    if isinstance(config_or_path, dict):
        return _config_from_dict(config_or_path, "the config dict"), str(config_or_path.get("model_type"))
    if not isinstance(config_or_path, (str, Path)):
        raise ConfigError(f"cannot estimate memory for a {type(config_or_path).__name__}; give a model dir, config.json, preset name, dict or config.")
    path = Path(config_or_path)
    if path.is_dir():
        from ..model.loader import check_model_dir, load_config

        return load_config(check_model_dir(path)), str(path)
    if path.is_file():
        data = _read_json(path)
        if data.get("auto_map"):
            raise ModelLoadError(f"{path} needs its own model code (auto_map); the memory report only handles architectures transformers ships.")
        return _config_from_dict(data, str(path)), str(path)
    name = str(config_or_path).strip().lower()
    if (PRESET_DIR / f"{name}.json").is_file():
        return _config_from_dict(_read_json(PRESET_DIR / f"{name}.json"), f"preset {name}"), name
    raise ConfigError(
        f"{config_or_path!r} is neither a model directory, a config.json file nor a known preset; "
        f"known presets: {', '.join(preset_names())}."
    )


# ---------------------------------------------------------------------------------------- inventory

ROLE_BY_NAME = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in", "c_attn": "attn_in",
    "query_key_value": "attn_in", "Wqkv": "attn_in",
    "o_proj": "attn_out", "out_proj": "attn_out", "dense": "attn_out",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "fc1": "mlp_in", "c_fc": "mlp_in",
    "w1": "mlp_in", "w3": "mlp_in", "dense_h_to_4h": "mlp_in",
    "down_proj": "mlp_out", "fc2": "mlp_out", "w2": "mlp_out", "dense_4h_to_h": "mlp_out",
}


@dataclass(frozen=True)
class Arch:
    """What in a decoder layer decides its saved tensors, beyond the sizes in the config."""

    norm: str = "llama"  # llama: w * x_fp32_normed.to(bf16); gemma: (x_fp32_normed * (1 + w.float())).to(bf16)
    norms_per_layer: int = 2
    gated_mlp: bool = True
    fused_qkv: bool = False
    rotary_cat: bool = False  # RoPE output made by torch.cat (contiguous [b, a, s, d]): SDPA's output is copied once more
    fused_gate_up: bool = False  # one gate_up_proj [2 x inter, hidden] instead of gate_proj and up_proj
    qk_norm: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    checked: bool = True  # the stored-activation formula is tested against this family on the CPU


def arch_for(config) -> Arch:
    """The `Arch` of a transformers config; unknown families get Llama's rules, marked unchecked."""
    model_type = config.model_type
    if model_type in ("llama", "mistral", "qwen2"):
        return Arch()
    if model_type == "phi3":
        return Arch(fused_qkv=True, rotary_cat=True, fused_gate_up=True)
    if model_type == "gemma":
        return Arch(norm="gemma")
    if model_type == "gemma2":
        return Arch(
            norm="gemma",
            norms_per_layer=4,
            attn_softcap=getattr(config, "attn_logit_softcapping", None) is not None,
            final_softcap=getattr(config, "final_logit_softcapping", None) is not None,
        )
    if model_type == "qwen3":
        return Arch(qk_norm=True, checked=False)
    return Arch(gated_mlp=getattr(config, "hidden_act", "gelu") in ("silu", "swiglu"), checked=False)


@dataclass(frozen=True)
class LinearInfo:
    """One linear layer of the skeleton: where it is and its shape."""

    path: str
    in_features: int
    out_features: int
    bias: bool
    layer: int | None  # decoder block index, None outside the blocks
    role: str  # attn_in, attn_out, mlp_in, mlp_out or other


@dataclass
class Inventory:
    """Exact parameter and buffer inventory of a model, plus the sizes the activation formulas need."""

    name: str
    config: Any
    arch: Arch
    model_type: str
    attn_implementation: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    sliding_window: int | None
    param_numel: dict[str, int]  # unique parameters (tied ones once) by name
    buffer_bytes: int
    linears: dict[str, LinearInfo]
    skeleton: Any = field(repr=False)
    target_cache: dict = field(default_factory=dict, repr=False)

    @property
    def total_params(self) -> int:
        """Parameters of the model, tied embeddings counted once."""
        return sum(self.param_numel.values())

    def targets(self, spec: Any) -> list[LinearInfo]:
        """The targeted linear layers (peft's rules, via `targets.resolve_targets` on the skeleton)."""
        from ..model.targets import resolve_targets

        key = spec if isinstance(spec, str) else tuple(spec)
        if key not in self.target_cache:
            self.target_cache[key] = [self.linears[path] for path in resolve_targets(self.skeleton, spec)]
        return self.target_cache[key]


def _role(path: str) -> str:
    name = path.rsplit(".", 1)[-1]
    if name == "c_proj":  # GPT-2 uses c_proj for both the attention output and the MLP output
        return "mlp_out" if ".mlp." in path else "attn_out"
    return ROLE_BY_NAME.get(name, "other")


def _layer_index(path: str, blocks: str | None) -> int | None:
    if not blocks or not path.startswith(blocks + "."):
        return None
    head = path[len(blocks) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _dims(config) -> dict[str, Any]:
    c = _text_config(config)
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return dict(
        hidden=hidden,
        intermediate=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden,
        layers=getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer"),
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=c.vocab_size,
        max_positions=getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None),
        sliding_window=getattr(c, "sliding_window", None) if not getattr(c, "use_sliding_window", True) is False else None,
    )


def _config_key(config) -> str:
    return config.to_json_string(use_diff=False)


_INVENTORIES: dict[tuple[str, str], Inventory] = {}
_INVENTORY_CACHE_SIZE = 16


def _build_inventory(config, name: str) -> Inventory:
    from ..model.loader import build_skeleton
    from ..model.lora import linear_dims
    from ..model.targets import decoder_blocks_path, linear_layers

    skeleton = build_skeleton(config)
    blocks = decoder_blocks_path(skeleton)
    linears = {}
    for path, module in linear_layers(skeleton).items():
        in_f, out_f = linear_dims(module)
        linears[path] = LinearInfo(path, in_f, out_f, getattr(module, "bias", None) is not None, _layer_index(path, blocks), _role(path))
    param_numel = {n: p.numel() for n, p in skeleton.named_parameters()}  # remove_duplicate: tied weights once
    seen, buffer_bytes = set(), 0
    for _, buf in skeleton.named_buffers():
        if buf is not None and id(buf) not in seen:
            seen.add(id(buf))
            buffer_bytes += buf.numel() * buf.element_size()
    return Inventory(
        name=name,
        config=config,
        arch=arch_for(config),
        model_type=config.model_type,
        attn_implementation=getattr(skeleton.config, "_attn_implementation", None) or "eager",
        param_numel=param_numel,
        buffer_bytes=buffer_bytes,
        linears=linears,
        skeleton=skeleton,
        **_dims(config),
    )


def build_inventory(config_or_path: Any) -> Inventory:
    """The exact inventory of a model (skeleton on the meta device; the last few are cached per config)."""
    config, name = resolve_config(config_or_path)
    key = (_config_key(config), name)
    if key not in _INVENTORIES:
        if len(_INVENTORIES) >= _INVENTORY_CACHE_SIZE:
            _INVENTORIES.pop(next(iter(_INVENTORIES)))
        _INVENTORIES[key] = _build_inventory(config, name)
    return _INVENTORIES[key]


# ------------------------------------------------------------------------------- persistent bytes


def quantized_weight_bytes(targets: list[LinearInfo], s: RunSettings) -> int:
    """Stored bytes of the targeted weights: packed 4-bit codes + absmax (+ nested stats) or int8 + row scales."""
    if s.bits == 4:  # quant.weight_bytes_4bit: bitsandbytes' QuantState layout, tested equal to real tensors
        return sum(weight_bytes_4bit(t.out_features, t.in_features, s.double_quant, s.blocksize) for t in targets)
    return sum(weight_bytes_8bit(t.out_features, t.in_features) for t in targets)  # LLM.int8: codes + fp32 scales


def unquantized_weight_bytes(inv: Inventory, targets: list[LinearInfo]) -> int:
    """bf16 bytes of every parameter that is not a targeted weight (embeddings, lm_head, norms, all biases)."""
    quantized = {f"{t.path}.weight" for t in targets}
    return BF16 * sum(n for name, n in inv.param_numel.items() if name not in quantized)  # loader keeps the rest bf16


def adapter_numels(targets: list[LinearInfo], rank: int) -> list[int]:
    """Element counts of every adapter tensor: A [r, in] and B [out, r] per targeted layer."""
    out = []
    for t in targets:
        out += [rank * t.in_features, t.out_features * rank]
    return out


def optimizer_state_bytes(numels: list[int], optimizer: str) -> tuple[int, int]:
    """(bytes, of which paged) of `AdapterOptimizer`: fp32 masters + the inner optimizer's state tensors."""
    masters = FP32 * sum(numels)  # fp32 master copy of each bf16 adapter tensor
    if optimizer == "adamw":
        return masters + sum(2 * FP32 * n + FP32 for n in numels), 0  # torch AdamW: exp_avg, exp_avg_sq fp32 + fp32 step
    total, paged, any_8bit = masters, 0, False
    for n in numels:
        if n < BNB_8BIT_MIN_SIZE:
            state = 2 * FP32 * n  # bitsandbytes keeps fp32 state1/state2 below min_8bit_size
        else:
            any_8bit = True
            state = 2 * n  # uint8 state1 + state2
            total += 2 * FP32 * math.ceil(n / BNB_STATE_BLOCK)  # fp32 absmax1/absmax2, one per 256-value block
        if optimizer == "paged_adamw_8bit" and n >= BNB_PAGED_MIN_NUMEL:
            paged += state  # state1/state2 in CUDA unified memory (cudaMallocManaged), outside torch's allocator
        total += state
    if any_8bit:
        total += 2 * 256 * FP32  # the shared 256-entry fp32 qmaps "dynamic" and "udynamic"
    return total, paged


# ------------------------------------------------------------------------------------ activations


@dataclass(frozen=True)
class LayerActivations:
    """Saved bytes of one decoder layer: `per_token` scales with batch*seq, `per_square` with batch*seq^2.

    `mlp_per_token` is the MLP's share of `per_token` (freed once the MLP's backward is done) and
    `norm_per_token` what one norm keeps; the backward working-set model needs both.
    """

    per_token: int
    per_square: int = 0  # bytes per (batch * seq_len^2): eager attention's probabilities
    constant: int = 0
    mlp_per_token: int = 0
    norm_per_token: int = 0

    def at(self, batch: int, seq: int) -> int:
        """Bytes for a micro-batch of `batch` sequences of `seq` tokens."""
        return self.per_token * batch * seq + self.per_square * batch * seq * seq + self.constant


def _role_input_bytes(role: str, inv: Inventory, in_features: int) -> int:
    # The tensor a LoRA A (or an 8-bit base) holds for backward: the norm output (hidden), the attention
    # output (heads * head_dim), the gated product (intermediate), bf16.
    q = inv.heads * inv.head_dim
    return BF16 * {"attn_in": inv.hidden, "mlp_in": inv.hidden, "attn_out": q, "mlp_out": inv.intermediate}.get(role, in_features)


def _attention_mode(inv: Inventory, s: RunSettings) -> str:
    impl = s.attn_implementation or inv.attn_implementation
    return "eager" if impl == "eager" else "flash"


def _sdpa_masked(inv: Inventory, s: RunSettings) -> bool:
    # transformers passes no mask to SDPA (is_causal) unless the batch is padded or a sliding window is shorter
    # than the sequence; with a mask SDPA runs the memory-efficient kernel, with K/V repeated to every head
    return s.padded or (inv.sliding_window is not None and s.seq_len > inv.sliding_window)


def _lora_saved(inv: Inventory, layer_targets: list[LinearInfo], s: RunSettings, mode: str) -> int:
    """Bytes per token the LoRA layers of `layer_targets` keep (their inputs and [tokens, r] intermediates)."""
    per_token = BF16 * s.rank * len(layer_targets)  # lora_B keeps its input, the [tokens, r] output of lora_A
    if s.lora_dropout > 0:
        return per_token + sum(3 * t.in_features for t in layer_targets)  # per LoRA: bf16 dropout output + bool mask
    roles = {t.role for t in layer_targets if not (t.role == "attn_out" and mode == "flash")}  # flash keeps O anyway
    # lora_A keeps its input for the weight gradient; layers reading the same tensor (q/k/v, gate/up) share it
    return per_token + sum(_role_input_bytes(r, inv, next(t.in_features for t in layer_targets if t.role == r)) for r in roles)


def layer_activations(inv: Inventory, layer_targets: list[LinearInfo], s: RunSettings, first: bool) -> LayerActivations:
    """Bytes autograd keeps for one decoder layer without checkpointing (Korthikanti et al. 2022, sec. 4.1, adapted).

    Every term is a tensor the backward of the op that made it needs, as the code runs in bf16 on
    transformers' modules, our `LoraLinear` and bitsandbytes' matmul functions.
    """
    h, i, a, d = inv.hidden, inv.intermediate, inv.heads, inv.head_dim
    q, kv = a * d, inv.kv_heads * d
    arch, mode = inv.arch, _attention_mode(inv, s)
    mlp_targets = [t for t in layer_targets if t.role in ("mlp_in", "mlp_out")]
    attn_targets = [t for t in layer_targets if t not in mlp_targets]
    norm = FP32 * h + FP32  # RMSNorm upcast: autograd keeps the fp32 input (pow/mul) and the fp32 rstd (mul/rsqrt)
    norms = arch.norms_per_layer - (1 if first else 0)  # layer 0's input norm sees embeddings that need no grad
    constant = norms * FP32 * h if arch.norm == "gemma" else 0  # gemma keeps the fp32 (1 + w) factor of each norm
    repeat_kv = inv.kv_heads != a and (mode == "eager" or _sdpa_masked(inv, s))  # transformers' repeat_kv copies K/V
    attn, per_square = _lora_saved(inv, attn_targets, s, mode), 0
    if mode == "flash":
        attn += BF16 * (2 * q + 2 * kv) + FP32 * a  # FlashAttention-2 backward inputs: Q, K, V, O + fp32 logsumexp
        if _sdpa_masked(inv, s):
            attn += BF16 * (q - kv) * 2 if repeat_kv else 0  # K and V repeated to every head for the masked kernel
            per_square += BF16  # memory-efficient SDPA keeps its bf16 additive mask [b, 1, s, s]
    else:
        attn += BF16 * 3 * q  # eager: Q, K and V repeated to every head (matmul inputs)
        per_square += a * (FP32 + BF16)  # fp32 softmax output + its bf16 copy (Korthikanti's 5as/h term, bf16)
        per_square += a * BF16 if arch.attn_softcap else 0  # tanh output of gemma2's logit soft-capping
    if arch.fused_qkv and not repeat_kv:
        attn += BF16 * (q + kv)  # V is a view of the fused qkv output, so Q and K's part of it stays alive too
    if arch.rotary_cat and mode == "flash" and any(t.role == "attn_out" for t in attn_targets) and s.lora_dropout == 0:
        attn += BF16 * q  # o_proj's LoRA keeps the contiguous copy of the [b, a, s, d] attention output
    if arch.qk_norm:
        attn += FP32 * (q + kv) + FP32 * (a + inv.kv_heads)  # per-head RMSNorm on q and k (fp32 input + rstd)
    # SwiGLU/GeGLU (Shazeer 2020): the activation keeps its input, the product keeps activation output and up
    mlp = BF16 * (3 * i if arch.gated_mlp else i) + _lora_saved(inv, mlp_targets, s, mode)
    return LayerActivations(norms * norm + attn + mlp, per_square, constant, mlp_per_token=mlp, norm_per_token=norm)


def bnb8_held_bytes(inv: Inventory, layer_targets: list[LinearInfo], first: bool) -> int:
    """Bytes per token that bitsandbytes' 8-bit matmul keeps in `ctx.tensors` (outside checkpointing's hooks).

    MatMul8bitLt (CUDA) and MatMul8bitFp (CPU) store their input A on ctx for backward; layer 0's attention
    projections see embeddings that need no grad, so their ctx is dropped.
    """
    roles = {t.role for t in layer_targets if not (first and t.role == "attn_in")}
    return sum(_role_input_bytes(r, inv, next(t.in_features for t in layer_targets if t.role == r)) for r in roles)


@dataclass(frozen=True)
class ActivationModel:
    """Activation bytes for a micro-batch, per layer and in total."""

    full_layer: LayerActivations  # one (non-first) layer, everything autograd keeps
    stored_layers: int  # all decoder layers at the end of the forward (checkpoint inputs, or everything)
    checkpoint_per_layer_token: int  # bytes per token a checkpointed layer keeps (input + 8-bit held inputs)
    final_norm: int  # the final norm's fp32 input + rstd
    misc: int  # rotary cos/sin, labels, and what the checkpoint closures keep (position ids, masks)
    masks: int  # the attention masks, alive during every forward


def activation_model(inv: Inventory, targets: list[LinearInfo], s: RunSettings) -> ActivationModel:
    """Stored activations of all decoder layers plus the small tensors around them."""
    by_layer: dict[int, list[LinearInfo]] = {k: [] for k in range(inv.layers)}
    for t in targets:
        if t.layer is not None:
            by_layer[t.layer].append(t)
    b, n, T = s.batch_size, s.seq_len, s.tokens
    stored, ckpt_token = 0, BF16 * inv.hidden
    for k in range(inv.layers):
        layer = by_layer[k]
        if s.gradient_checkpointing:
            # transformers' gradient_checkpointing_enable makes the embedding output require grad, so layer 0 is like the rest
            held = bnb8_held_bytes(inv, layer, first=False) if s.bits == 8 else 0
            layer_input = 0 if s.offload_activations else BF16 * inv.hidden  # offloaded: save_on_cpu moves it to host memory
            stored += (layer_input + held) * T  # non-reentrant checkpoint keeps the layer input (+ what bnb holds)
            ckpt_token = max(ckpt_token, BF16 * inv.hidden + held)
        else:
            acts = layer_activations(inv, layer, s, first=k == 0)
            held = bnb8_held_bytes(inv, layer, k == 0) if s.bits == 8 and s.lora_dropout > 0 else 0
            stored += acts.at(b, n) + held * T  # with dropout the 8-bit layer's input is not shared with LoRA
    reference = max(by_layer.values(), key=len) if targets else []
    full = layer_activations(inv, reference, s, first=False)
    final_norm = (FP32 * inv.hidden + FP32) * T  # the final RMSNorm's fp32 input and rstd
    final_norm += FP32 * inv.hidden if inv.arch.norm == "gemma" else 0  # and gemma's fp32 (1 + w)
    masks = attention_mask_bytes(inv, s)
    rotary = 2 * BF16 * n * inv.head_dim  # cos and sin [1, s, head_dim], computed once per forward
    labels = 8 * T  # shifted int64 labels kept by nll_loss
    kept_by_checkpoint = 8 * n + masks if s.gradient_checkpointing else 0  # position ids [1, s] int64 and the masks
    return ActivationModel(full, stored, ckpt_token, final_norm, rotary + labels + kept_by_checkpoint, masks)


def attention_mask_bytes(inv: Inventory, s: RunSettings) -> int:
    """The 4-D masks transformers builds for a forward (none when SDPA can use is_causal)."""
    b, n = s.batch_size, s.seq_len
    if _attention_mode(inv, s) == "eager":
        kinds = 2 if inv.sliding_window is not None and inv.model_type == "gemma2" else 1
        return kinds * BF16 * b * n * n  # transformers' eager masks: [b, 1, s, s] in bf16, one per layer type
    if _sdpa_masked(inv, s):
        return b * n * n  # bool sliding-window mask [b, 1, s, s]
    return 0


def loss_bytes(inv: Inventory, s: RunSettings) -> tuple[int, int, int]:
    """(peak bytes of the loss, bytes it keeps after the forward, cached-but-unusable bytes) for the micro-batch.

    transformers' ForCausalLMLoss and qlora_lite.train (fp32 cross-entropy on `.logits`) both upcast the bf16
    logits to fp32 and call cross_entropy = log_softmax + nll_loss; the peak is in log_softmax's backward:
    fp32 grad in + saved fp32 log-probs + fp32 grad out (3 x 4 bytes per logit), the bf16 logits being
    freed before backward (the caller keeps only the loss). The trainer drops the last position (s - 1
    logits per sequence); counting s is conservative by one token.
    """
    tokens = min(s.loss_chunk_tokens, s.tokens) if s.chunked_loss else s.tokens
    logits = tokens * inv.vocab
    softcap = BF16 * logits if inv.arch.final_softcap else 0  # gemma2: tanh output of the final soft-capping
    peak = 3 * FP32 * logits + softcap  # log_softmax backward: grad in, saved output, grad out (fp32)
    kept = FP32 * logits + softcap + 2 * FP32  # saved log-probs (+ tanh), nll's total_weight, the loss
    if s.chunked_loss:
        # qlora_lite.loss per chunk: fp32 logits reused in place for the softmax, plus logsumexp's fp32 temporary
        # (the bf16 matmul output and the bf16 logit gradient are smaller and live beside the fp32 buffer only)
        peak = 2 * FP32 * logits + (FP32 * logits if inv.arch.final_softcap else 0)
        peak += BF16 * inv.hidden * s.tokens  # gradient of the final hidden states, accumulated chunk by chunk
        kept = BF16 * inv.hidden * s.tokens + 2 * FP32  # that gradient waits for backward, with the loss
    cached = BF16 * logits  # the bf16 logits' block, freed before the fp32 ones are, too small to reuse (CUDA)
    return peak, kept, cached


# -------------------------------------------------------------------------------- temporaries


def dequant_bytes(t: LinearInfo, s: RunSettings) -> int:
    """Temporary bytes to dequantize one weight: bf16 [out, in] (+ fp32 absmax when double-quantized)."""
    dense = BF16 * t.out_features * t.in_features  # bitsandbytes dequantize_4bit / CB * SCB / 127 in bf16
    if s.bits == 4 and s.double_quant:
        dense += FP32 * math.ceil(t.out_features * t.in_features / s.blocksize)  # nested absmax dequantized to fp32
    return dense


def forward_base_temp(t: LinearInfo, s: RunSettings) -> int:
    """Bytes the quantized base of one layer holds while it runs forward, beyond its bf16 output."""
    if s.bits == 8 and s.device == "cuda":
        # MatMul8bitLt: int8 copy of the input, int32 matmul result and its fp16 dequantized copy
        return (t.in_features + (FP32 + BF16) * t.out_features) * s.tokens
    # bitsandbytes gemm_4bit on CUDA dequantizes + F.linear above 1536 rows (and may below, per GPU);
    # MatMul8bitFp (CPU) multiplies by the dequantized CB
    return dequant_bytes(t, s)


RMSNORM_BACKWARD = 5 * FP32  # autograd of the fp32 RMSNorm: grad.float(), grad*rstd, grad*x, x^1 * 2, their product


def working_sets(inv: Inventory, targets: list[LinearInfo], acts: ActivationModel, s: RunSettings) -> dict[str, tuple[int, int]]:
    """{phase: (working set, dequantization part)}: bytes beyond the stored activations at each phase's worst moment."""
    T, h, i = s.tokens, inv.hidden, inv.intermediate
    q, kv = inv.heads * inv.head_dim, inv.kv_heads * inv.head_dim
    wide = max(targets, key=lambda t: t.out_features * t.in_features) if targets else None
    dq_fwd = forward_base_temp(wide, s) if wide else 0
    dq_bwd = dequant_bytes(wide, s) if wide else 0
    full = acts.full_layer
    saved = full.at(s.batch_size, s.seq_len)
    # forward: the up projection's LoraLinear holds base output, lora_B output and the scaled update (3 x its
    # out_features), or the base output while the base still holds its dequantized weight / int8 temporaries
    fused = inv.arch.fused_gate_up
    width = 2 * i if fused else i  # out_features of the up (gate_up) projection
    up_lora, up_base = (BF16 * 3 * width * T, 0), (BF16 * width * T, dq_fwd)
    transient = max(up_lora, up_base, key=sum)
    mlp_in = any(t.role == "mlp_in" for t in targets) and s.lora_dropout == 0
    # MLP tensors already saved when the up projection runs: norm output (kept by LoRA), gate output and activation
    partial = BF16 * h * mlp_in + (BF16 * 2 * i if inv.arch.gated_mlp and not fused else 0)
    rest = full.mlp_per_token - partial  # MLP tensors saved only after the up projection has run
    residual = BF16 * h * T  # the residual stream after attention, alive (not saved) through the MLP
    if s.gradient_checkpointing:
        # nothing is saved: alive are the residual, the norm output and (unfused) the activation output; the 8-bit
        # down projection's input, counted in the stored total, does not exist yet
        live = residual + BF16 * h * T + (BF16 * i * T if inv.arch.gated_mlp and not fused else 0)
        not_yet = BF16 * i * T if s.bits == 8 and any(t.role == "mlp_out" for t in targets) else 0
        forward = (max(live + transient[0] - not_yet, 0), transient[1])
    else:
        forward = (max(residual + transient[0] - rest * T, 0), transient[1])  # the stored total counts the whole layer
    if _attention_mode(inv, s) == "eager":
        # scores (bf16), their fp32 copy and the fp32 softmax; under checkpointing the saved probabilities are transient too
        probs = (BF16 + FP32 + (FP32 + BF16 + (BF16 if inv.arch.attn_softcap else 0) if s.gradient_checkpointing else FP32))
        forward = max(forward, (probs * inv.heads * s.batch_size * s.seq_len**2, 0), key=sum)
    # backward of the last layer; with checkpointing its saved tensors are first recomputed on top of the stored ones
    recompute = saved if s.gradient_checkpointing else 0
    grad_in = BF16 * h * T  # gradient of the layer output, also kept for the residual branch
    product_saved = any(t.role == "mlp_out" for t in targets) and s.lora_dropout == 0
    # the product's gradient (inter) takes the place of the saved product, freed by lora_A's backward; when
    # down_proj has no LoRA the product was never saved and its gradient comes on top
    extra = 0 if product_saved else BF16 * i * T
    # then either the base's input gradient while its weight is dequantized, or the gated product's backward:
    # gradients of the activation output and of up (2 x inter)
    mlp = max((BF16 * 2 * i * T, 0), (BF16 * i * T, dq_bwd), key=sum)
    candidates = {"mlp": (recompute + grad_in + extra + mlp[0], mlp[1])}
    if s.gradient_checkpointing:  # the recomputation itself, at the up projection (as in the forward)
        candidates["recompute"] = (recompute - rest * T + grad_in + residual + transient[0], transient[1])
    after_mlp = recompute - full.mlp_per_token * T
    # RMSNorm backward in fp32 (five [tokens, hidden] fp32 temporaries) with the residual and norm-output grads
    candidates["norm"] = (after_mlp + 2 * grad_in + RMSNORM_BACKWARD * h * T, 0)
    attn = after_mlp - full.norm_per_token * T + grad_in + BF16 * (q + 2 * kv) * T  # dq, dk, dv
    if _attention_mode(inv, s) == "flash":
        attn += (FP32 * q + (2 * BF16 * q if kv != q else 0)) * T if s.device == "cuda" else 0  # FA2 fp32 dq accumulator, GQA dk/dv
    else:
        attn += (2 * FP32 + BF16) * inv.heads * s.batch_size * s.seq_len**2  # softmax backward: fp32 grads in/out + bf16
    candidates["attention"] = (attn, 0)
    candidates["final_norm"] = (acts.final_norm + grad_in + RMSNORM_BACKWARD * h * T, 0)
    backward = max(candidates.values(), key=sum)
    return {"forward": forward, "backward": backward}


# ------------------------------------------------------------------------------------------ report

COMPONENT_LABELS = {
    "quantized_weights": "quantized base weights",
    "unquantized_weights": "unquantized weights (bf16)",
    "buffers": "buffers",
    "lora_adapters": "LoRA adapters (bf16)",
    "lora_gradients": "LoRA gradients (bf16)",
    "gradient_accumulation": "fp32 gradients (accumulation)",
    "optimizer_state": "optimizer state",
    "workspaces": "cuBLAS workspaces",
    "activations": "stored activations",
    "layer_working_set": "layer recompute / working set",
    "logits_and_loss": "logits and loss",
    "dequant_temporaries": "dequantization temporaries",
    "optimizer_step": "optimizer step temporaries",
    "allocator_reserve": "allocator reserve",
    "cuda_context": "CUDA context",
}


@dataclass
class MemoryReport:
    """Bytes per component at the peak of a training step, the total, and what the estimate assumed.

    `components` holds what is alive at the peak (they add up to `total`); `other_phases` holds the
    transient components of the phases that are not the peak, for reference.
    """

    model: str
    model_type: str
    settings: RunSettings
    components: dict[str, int]
    other_phases: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    allocated_peak: int
    reserved_peak: int
    paged_bytes: int
    total: int
    details: dict[str, Any]
    notes: list[str]

    def size(self, name: str) -> int:
        """Bytes of a component, at the peak or (if not alive then) at its own phase's worst; 0 if absent."""
        return self.components.get(name, self.other_phases.get(name, 0))

    def fits(self, budget_bytes: int) -> bool:
        """True when the predicted total fits in `budget_bytes` of GPU memory."""
        return self.total <= budget_bytes

    def headroom(self, budget_bytes: int) -> int:
        """budget - total (negative when it does not fit)."""
        return budget_bytes - self.total

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything in the report."""
        out = asdict(self)
        out["settings"] = asdict(self.settings)
        return out


def _persistent(inv: Inventory, targets: list[LinearInfo], s: RunSettings) -> tuple[dict[str, int], int]:
    numels = adapter_numels(targets, s.rank)
    optimizer, paged = optimizer_state_bytes(numels, s.optimizer_in_use)
    parts = {
        "quantized_weights": quantized_weight_bytes(targets, s),
        "unquantized_weights": unquantized_weight_bytes(inv, targets),
        "buffers": inv.buffer_bytes,
        "lora_adapters": BF16 * sum(numels),
        "optimizer_state": optimizer,
    }
    if s.device == "cuda":
        parts["workspaces"] = 2 * CUBLAS_WORKSPACE  # one cuBLAS handle for the forward thread, one for autograd's
    return parts, paged


def _check_rank(targets: list[LinearInfo], rank: int) -> None:
    for t in targets:
        if rank > min(t.in_features, t.out_features):
            raise ConfigError(
                f"rank is {rank}, larger than the smaller side ({min(t.in_features, t.out_features)}) of layer {t.path} "
                f"[{t.out_features} x {t.in_features}]; use rank <= {min(t.in_features, t.out_features)}."
            )


def _phases(inv: Inventory, targets: list[LinearInfo], s: RunSettings, persistent: dict[str, int]) -> dict[str, dict[str, int]]:
    acts = activation_model(inv, targets, s)
    loss_peak, _, _ = loss_bytes(inv, s)
    ws = working_sets(inv, targets, acts, s)
    numel = sum(adapter_numels(targets, s.rank))
    bf16_grads = BF16 * numel  # .grad of each bf16 adapter tensor, alive from backward to accumulate_grads
    fp32_grads = FP32 * numel  # AdapterOptimizer.accumulate_grads: fp32 .grad on the masters until the step
    accumulated = fp32_grads if s.grad_accum > 1 else 0  # micro-batches after the first run with them alive
    step_temp = FP32 * numel if s.optimizer_in_use == "adamw" and s.device == "cuda" else 0  # foreach AdamW's sqrt list
    stored = acts.stored_layers + acts.misc
    phases = {
        "forward": {**persistent, "gradient_accumulation": accumulated,
                    "activations": stored + (0 if s.gradient_checkpointing else acts.masks),
                    "layer_working_set": ws["forward"][0], "dequant_temporaries": ws["forward"][1]},
        "loss": {**persistent, "gradient_accumulation": accumulated, "activations": stored + acts.final_norm,
                 "logits_and_loss": loss_peak},
        "backward": {**persistent, "lora_gradients": bf16_grads, "gradient_accumulation": accumulated, "activations": stored,
                     "layer_working_set": ws["backward"][0], "dequant_temporaries": ws["backward"][1]},
        "optimizer": {**persistent, "gradient_accumulation": fp32_grads, "optimizer_step": step_temp},
    }
    return {name: {k: v for k, v in parts.items() if v or k in persistent} for name, parts in phases.items()}


def _reserve(inv: Inventory, targets: list[LinearInfo], s: RunSettings, phases: dict[str, dict[str, int]], persistent: int) -> tuple[int, str]:
    """(reserved bytes at the reserved peak, its phase) under the CUDA caching allocator."""
    _, _, cached_logits = loss_bytes(inv, s)
    forward_ws = sum(working_sets(inv, targets, activation_model(inv, targets, s), s)["forward"])
    extra = {"loss": cached_logits + forward_ws}  # freed blocks too small for the loss's allocations stay cached
    reserved = {name: sum(parts.values()) + extra.get(name, 0) for name, parts in phases.items()}
    phase = max(reserved, key=reserved.get)
    slack = ALLOCATOR_SLACK * (reserved[phase] - persistent)  # rounding to 512 B / 2 MiB blocks and splitting
    return int(reserved[phase] + slack), phase


def _notes(inv: Inventory, s: RunSettings, paged: int) -> list[str]:
    notes = []
    if not inv.arch.checked:
        notes.append(f"activation formulas for model_type {inv.model_type!r} follow Llama's layer layout and are not checked against it")
    if s.attn_implementation and s.attn_implementation != inv.attn_implementation:
        notes.append(f"attention counted as {s.attn_implementation}; transformers picks {inv.attn_implementation} for this config")
    if paged:
        notes.append(f"{paged / GiB:.2f} GiB of optimizer state is paged (unified memory): counted, but it can move to CPU RAM under pressure")
    if s.bits == 8 and s.gradient_checkpointing:
        notes.append("8-bit layers keep their inputs for backward outside checkpointing (bitsandbytes MatMul8bitLt ctx.tensors)")
    if inv.max_positions and s.seq_len > inv.max_positions:
        notes.append(f"seq_len {s.seq_len} is longer than the model's context ({inv.max_positions} positions); training would refuse it")
    if s.targets != "all-linear":
        notes.append("linear layers outside the LoRA targets stay bf16: the trainer quantizes only lora.target_modules")
    if _sdpa_masked(inv, s) and _attention_mode(inv, s) == "flash":
        why = "padded micro-batches" if s.padded else f"sequences longer than the sliding window ({inv.sliding_window})"
        notes.append(f"{why} need an attention mask: SDPA's memory-efficient kernel with K/V repeated (counted)")
    return notes


def estimate_memory(config_or_path: Any, **run_settings: Any) -> MemoryReport:
    """Predict the GPU memory of one QLoRA training step; see the module doc for the model.

    `config_or_path`: a `TrainConfig` (its model and settings; `run_settings` may add memory-only ones such as
    `device`), or a model directory, a config.json path, a transformers config, a dict or a preset name
    (`preset_names()`) with `run_settings` the fields of `RunSettings` (bits, rank, targets, seq_len,
    batch_size, gradient_checkpointing, optimizer, loss_chunk_tokens, ...), whose defaults are the trainer's.
    Raises `ConfigError` for settings that cannot describe a run and for unknown presets.
    """
    from ..config.settings import TrainConfig
    from .settings import settings_from_config

    if isinstance(config_or_path, TrainConfig):
        config_or_path.validate(for_training=False)
        settings = settings_from_config(config_or_path, **run_settings)
        config_or_path = config_or_path.model
    else:
        settings = make_settings(**run_settings)
    return report_for(build_inventory(config_or_path), settings)


def report_for(inv: Inventory, s: RunSettings) -> MemoryReport:
    """The report for an already built inventory (fast: pure arithmetic, used by the recommendations)."""
    targets = inv.targets(s.targets)
    _check_rank(targets, s.rank)
    persistent, paged = _persistent(inv, targets, s)
    phases = _phases(inv, targets, s, persistent)
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    allocated = totals[peak_phase]  # what torch.cuda.max_memory_allocated would show
    components = dict(phases[peak_phase])
    if s.device == "cuda":
        # the table shows the phase where the reserve peaks (usually the same one), plus the reserve on top of it
        reserved, peak_phase = _reserve(inv, targets, s, phases, sum(persistent.values()))
        components = dict(phases[peak_phase])
        components["allocator_reserve"] = reserved - totals[peak_phase]
        components["cuda_context"] = s.cuda_context_bytes
    else:
        reserved = allocated
    other = {}
    for name, parts in phases.items():
        for key, value in parts.items():
            if key not in components and value > other.get(key, 0):
                other[key] = value
    acts = activation_model(inv, targets, s)
    _, loss_kept, _ = loss_bytes(inv, s)
    first = [t for t in targets if t.layer == 0]
    details = {
        "parameters": inv.total_params,
        "targeted_layers": len(targets),
        "adapter_parameters": sum(adapter_numels(targets, s.rank)),
        "attention": _attention_mode(inv, s),
        "default_attention": "eager" if inv.attn_implementation == "eager" else "flash",
        "layers": inv.layers,
        "vocab_size": inv.vocab,
        "optimizer_in_use": s.optimizer_in_use,
        "tokens_per_micro_batch": s.tokens,
        "activation_bytes_per_token_per_layer": acts.full_layer.per_token,
        "activation_bytes_per_seq2_per_layer": acts.full_layer.per_square,
        "checkpointed_bytes_per_token_per_layer": acts.checkpoint_per_layer_token,
        "first_layer_activation_bytes": layer_activations(inv, first, s, first=True).at(s.batch_size, s.seq_len),
        "stored_after_forward": acts.stored_layers + acts.misc + acts.final_norm + loss_kept,
        "phase_totals": totals,
    }
    return MemoryReport(
        model=inv.name,
        model_type=inv.model_type,
        settings=s,
        components=components,
        other_phases=other,
        peak_phase=peak_phase,
        phases=totals,
        allocated_peak=allocated,
        reserved_peak=reserved,
        paged_bytes=paged,
        total=sum(components.values()),
        details=details,
        notes=_notes(inv, s, paged),
    )


def with_settings(report: MemoryReport, **changes: Any) -> RunSettings:
    """The report's settings with some fields changed (validated)."""
    settings = replace(report.settings, **changes)
    settings.validate()
    return settings


def describe_components(report: MemoryReport) -> dict[str, str]:
    """One line per component saying what is counted (for the command's table)."""
    s, d = report.settings, report.details
    quant = f"{s.quant_type.upper()}, absmax per {s.blocksize}" + (" + double-quant stats" if s.double_quant else "") if s.bits == 4 else "LLM.int8 codes + fp32 row scales"
    full = f"{d['activation_bytes_per_token_per_layer']:,} B/token" + (
        f" + {d['activation_bytes_per_seq2_per_layer']} B/seq^2" if d["activation_bytes_per_seq2_per_layer"] else ""
    )
    kept = f"{d['checkpointed_bytes_per_token_per_layer']:,} B/token"
    ckpt = f"{kept} (checkpointing; {full} without)" if s.gradient_checkpointing else f"{full} ({kept} with checkpointing)"
    loss_tokens = min(s.loss_chunk_tokens, s.tokens) if s.chunked_loss else s.tokens
    return {
        "quantized_weights": f"{d['targeted_layers']} layers, {s.bits}-bit {quant}",
        "unquantized_weights": "embeddings, lm_head (tied once), norms, biases",
        "buffers": "rotary tables and other buffers",
        "lora_adapters": f"{d['adapter_parameters']:,} params, r={s.rank}",
        "lora_gradients": "one bf16 .grad per adapter tensor (during backward)",
        "gradient_accumulation": f"fp32 .grad on the masters ({s.grad_accum} micro-batches per step)",
        "optimizer_state": f"{d['optimizer_in_use']}: fp32 masters + moments",
        "workspaces": "2 cuBLAS handles x 32 MiB",
        "activations": f"{d['layers']} layers x {ckpt}",
        "layer_working_set": ("one layer recomputed + its gradients" if s.gradient_checkpointing else "one layer's gradients and temporaries"),
        "logits_and_loss": f"3 x fp32 [{loss_tokens:,} x {d['vocab_size']:,}] in log_softmax backward",
        "dequant_temporaries": "largest weight dequantized to bf16",
        "optimizer_step": "torch AdamW's foreach temporaries",
        "allocator_reserve": "freed blocks the peak cannot reuse + 3% slack",
        "cuda_context": "CUDA context and kernels (outside torch)",
    }
