"""What a model is made of, counted exactly: its config (from a model dir, a config.json, a dict or a shipped
preset), the linear layers and their roles, and every parameter and buffer of its skeleton.

The skeleton is built on the meta device from the config, so every architecture transformers knows works
and no weights are read; `build_inventory` caches the last few per config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelLoadError

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"

# ------------------------------------------------------------------------------------------- config


def preset_names() -> list[str]:
    """Names of the shipped architecture presets (config.json numbers, no weights)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _config_from_dict(data: dict, where: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..model.checks import CONFIG_ERRORS, CONFIG_FIX, check_config_fields, config_problem

    check_config_fields(data, where)
    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"{where} has no model_type; give a Hugging Face config.json (it names the architecture).")
    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{where} declares model_type {model_type!r}, which transformers does not know; "
            "upgrade transformers (pip install -U transformers) or use a supported model."
        )
    try:
        return AutoConfig.for_model(model_type, **data)
    except CONFIG_ERRORS as exc:  # transformers 5 raises huggingface_hub's StrictDataclass*Error, 4.x ValueError
        raise ModelLoadError(
            f"{where} is not a valid {model_type!r} config ({config_problem(exc)}); {CONFIG_FIX}."
        ) from None


def _read_json(path: Path) -> dict:
    from ..io.json_files import read_json_object

    return read_json_object(path, "a Hugging Face config.json", ModelLoadError, "give a valid config.json")


# Hub ids whose names do not reduce to a preset's name (see preset_for_hub_id)
HUB_ID_PRESETS = {"mistralai/mistral-7b-v0.3": "mistral-7b", "mistralai/mistral-7b-instruct-v0.3": "mistral-7b",
                  "microsoft/phi-3-mini-4k-instruct": "phi-3-mini"}  # fmt: skip


def preset_for_hub_id(repo_id: str) -> str | None:
    """The shipped preset with the architecture of a hub model, if any: `Qwen/Qwen2.5-1.5B-Instruct` ->
    `qwen2.5-1.5b`, `meta-llama/Llama-3.1-8B` -> `llama-3.1-8b` (instruct / chat / -it variants share it)."""
    key = repo_id.strip().lower()
    if key in HUB_ID_PRESETS:
        return HUB_ID_PRESETS[key]
    name = key.split("/", 1)[-1]
    for suffix in ("-instruct", "-chat", "-it"):
        name = name.removesuffix(suffix)
    return name if (PRESET_DIR / f"{name}.json").is_file() else None


def resolve_config(config_or_path: Any) -> tuple[Any, str]:
    """(transformers config, display name) from a model dir, a config.json path, a config, a dict, a preset name,
    or a hub id (its preset when there is one, else its config.json through the HF cache)."""
    from transformers import PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path, getattr(config_or_path, "name_or_path", "") or config_or_path.model_type
    if isinstance(config_or_path, dict):
        return _config_from_dict(config_or_path, "the config dict"), str(config_or_path.get("model_type"))
    if not isinstance(config_or_path, (str, Path)):
        raise ConfigError(
            f"cannot estimate memory for a {type(config_or_path).__name__}; give a model dir, config.json, preset name, dict or config."
        )
    path = Path(config_or_path)
    if path.is_dir():
        from ..model.loader import check_model_dir, load_config

        return load_config(check_model_dir(path)), str(path)
    if path.is_file():
        data = _read_json(path)
        if data.get("auto_map"):
            raise ModelLoadError(
                f"{path} needs its own model code (auto_map); the memory report only handles architectures transformers ships."
            )
        return _config_from_dict(data, str(path)), str(path)
    name = str(config_or_path).strip().lower()
    if (PRESET_DIR / f"{name}.json").is_file():
        return _config_from_dict(_read_json(PRESET_DIR / f"{name}.json"), f"preset {name}"), name
    from ..io.hub import looks_like_hub_id, resolve_model_dir

    if looks_like_hub_id(str(config_or_path)):
        preset = preset_for_hub_id(str(config_or_path))
        if preset is not None:
            return resolve_config(preset)
        from ..model.loader import load_config

        folder = resolve_model_dir(str(config_or_path))  # config.json from the HF cache (or the hub)
        return load_config(folder), str(config_or_path)
    raise ConfigError(
        f"{config_or_path!r} is neither a model directory, a config.json file nor a known preset; "
        f"known presets: {', '.join(preset_names())}."
    )


# ---------------------------------------------------------------------------------------- inventory

ROLE_BY_NAME = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "qkv_proj": "attn_in",
    "c_attn": "attn_in",
    "query_key_value": "attn_in",
    "Wqkv": "attn_in",
    "o_proj": "attn_out",
    "out_proj": "attn_out",
    "dense": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "gate_up_proj": "mlp_in",
    "fc1": "mlp_in",
    "c_fc": "mlp_in",
    "w1": "mlp_in",
    "w3": "mlp_in",
    "dense_h_to_4h": "mlp_in",
    "down_proj": "mlp_out",
    "fc2": "mlp_out",
    "w2": "mlp_out",
    "dense_4h_to_h": "mlp_out",
}


@dataclass(frozen=True)
class Arch:
    """What in a decoder layer decides its saved tensors, beyond the sizes in the config."""

    norm: str = "llama"  # llama: w * x_fp32_normed.to(bf16); gemma: (x_fp32_normed * (1 + w.float())).to(bf16)
    norms_per_layer: int = 2
    gated_mlp: bool = True
    fused_qkv: bool = False
    rotary_cat: bool = (
        False  # RoPE output made by torch.cat (contiguous [b, a, s, d]): SDPA's output is copied once more
    )
    fused_gate_up: bool = False  # one gate_up_proj [2 x inter, hidden] instead of gate_proj and up_proj
    qk_norm: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    checked: bool = True  # the stored-activation formula is tested against this family on the CPU


def arch_for(config: Any) -> Arch:
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


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _dims(config: Any) -> dict[str, Any]:
    c = _text_config(config)
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return dict(
        hidden=hidden,
        intermediate=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden,
        layers=getattr(c, "num_hidden_layers", None) or c.n_layer,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=c.vocab_size,
        max_positions=getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None),
        sliding_window=getattr(c, "sliding_window", None)
        if getattr(c, "use_sliding_window", True) is not False
        else None,
    )


def _config_key(config: Any) -> str:
    return config.to_json_string(use_diff=False)


_INVENTORIES: dict[tuple[str, str], Inventory] = {}
_INVENTORY_CACHE_SIZE = 16


def _build_inventory(config: Any, name: str) -> Inventory:
    from ..model.loader import build_skeleton
    from ..model.lora import linear_dims
    from ..model.targets import decoder_blocks_path, linear_layers

    skeleton = build_skeleton(config, where=name)
    blocks = decoder_blocks_path(skeleton)
    linears = {}
    for path, module in linear_layers(skeleton).items():
        in_f, out_f = linear_dims(module)
        linears[path] = LinearInfo(
            path, in_f, out_f, getattr(module, "bias", None) is not None, _layer_index(path, blocks), _role(path)
        )
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
