"""Build a model skeleton without weights, then stream tensors from safetensors into quantized or bf16 form.

Peak memory while loading is the quantized model so far + one tensor in bf16 + a fixed overhead: the
skeleton's parameters live on the meta device, each checkpoint tensor is read alone (plain reads, no
mmap), and a targeted weight is quantized and dropped before the next tensor is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config.settings import QuantConfig
from ..errors import DataError, ModelLoadError
from ..io.heap import malloc_trim
from ..io.json_files import read_json_object
from ..io.safetensors import SafetensorsFile, weight_files
from . import quant
from .checks import (
    BUILD_ERRORS,
    CONFIG_ERRORS,
    CONFIG_FIX,
    check_checkpoint,
    check_config_fields,
    check_tokenizer_files,
    config_problem,
)
from .checks import checkpoint_key_map as checkpoint_key_map  # re-exported: export/ maps keys with it too
from .targets import TargetSpec, resolve_targets

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules with parameters on the meta device but real buffers (rotary tables, masks)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = module._parameters[name].__dict__
            module._parameters[name] = (
                type(param)(param.to("meta"), **kwargs)
                if kwargs
                else nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            )

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def check_model_dir(model_path: str | Path, revision: str | None = None) -> Path:
    """The model directory as a Path (a hub id resolves through the HF cache, at `revision`: a branch, tag or
    commit, None or "" for main), or a `ModelLoadError` saying what is missing."""
    from ..io.hub import resolve_model_dir

    model_dir = resolve_model_dir(model_path, revision or None)
    if not model_dir.exists():
        raise ModelLoadError(
            f"model directory {model_dir} does not exist; give the path of a Hugging Face model directory."
        )
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir} is a file, not a model directory; give the folder that holds config.json.")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{model_dir} has no config.json; point to a Hugging Face model directory (config.json + *.safetensors)."
        )
    return model_dir


def load_config(model_dir: Path, trust_remote_code: bool = False):
    """transformers' config for the model dir; a malformed config.json, or one transformers rejects, becomes
    one sentence naming the file and the problem."""
    from transformers import AutoConfig

    path = model_dir / "config.json"
    raw = read_json_object(path, "a model config", fix=CONFIG_FIX)
    check_config_fields(raw, path)
    if raw.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"{model_dir} needs its own model code (config.json has auto_map), which runs only with "
            "trust_remote_code: true; turn that on only if you trust the code in that directory."
        )
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (
        OSError,
        ImportError,
    ) as exc:  # trust_remote_code on, but the code files auto_map names are missing or broken
        raise ModelLoadError(
            f"the model code of {model_dir} cannot be loaded ({_first_sentence(exc)}); add the files config.json's auto_map "
            "names, or use a model that transformers supports without remote code."
        ) from None
    except CONFIG_ERRORS as exc:  # transformers 5 raises huggingface_hub's StrictDataclass*Error, 4.x ValueError
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = raw.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ModelLoadError(
                f"{path} declares model_type {model_type!r}, which transformers "
                f"{transformers.__version__} does not know; upgrade transformers (pip install -U transformers) or use a supported model."
            ) from None
        raise ModelLoadError(
            f"{path} is not a valid {model_type!r} config ({config_problem(exc)}); {CONFIG_FIX}."
        ) from None


def _first_sentence(exc: BaseException, limit: int = 200) -> str:
    """The first sentence of an exception's message, for embedding in one-line errors."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_skeleton(config, trust_remote_code: bool = False, where: str = "this config") -> nn.Module:
    """The causal LM with all parameters on the meta device (no weight memory) and real buffers."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(quant.COMPUTE_DTYPE)
    try:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except BUILD_ERRORS as exc:  # sizes transformers' config validation let through (negative, inconsistent)
        raise ModelLoadError(
            f"transformers cannot build a causal LM from {where} ({config_problem(exc, 160)}); fix the config."
        ) from None
    finally:
        torch.set_default_dtype(previous)
    return model


def _set_tensor(model: nn.Module, path: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = path.rpartition(".")
    module = model.get_submodule(module_path)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _tied_groups(model: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


@dataclass
class LoadPlan:
    """What a load decided before reading any weight: the skeleton (parameters on the meta device), the shards with
    each one's checkpoint key -> parameter name map (headers checked against the skeleton), the module paths to
    quantize, the tied parameter groups and the quantization settings."""

    model_dir: Path
    model: nn.Module
    shards: list[SafetensorsFile]
    key_maps: list[dict[str, str]]
    targets: set[str]
    tied: list[list[str]]
    settings: QuantConfig
    device: torch.device


def plan_load(
    model_path: str | Path,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    device: str | torch.device | None = None,
    target_modules: TargetSpec = "all-linear",
    *,
    blocksize: int = 64,
    int8_threshold: float = 6.0,
    trust_remote_code: bool = False,
    load_tokenizer: bool = False,
) -> LoadPlan:
    """Every check of `load_quantized` and its skeleton, without reading a weight (a sharded loader starts here)."""
    from .arguments import check_load_arguments  # wrong types refused before torch or bitsandbytes see them

    check_load_arguments(
        model_path, bits, quant_type, double_quant, device, target_modules, blocksize, int8_threshold,
        trust_remote_code, load_tokenizer,
    )  # fmt: skip
    settings = QuantConfig(
        bits=bits, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, int8_threshold=int8_threshold
    )
    quant.check_bits(bits)
    settings.validate()
    model_dir = check_model_dir(model_path)
    shards = [SafetensorsFile(p) for p in weight_files(model_dir)]
    config = load_config(model_dir, trust_remote_code)
    device = torch.device(device) if device is not None else default_device()

    model = build_skeleton(config, trust_remote_code, f"{model_dir / 'config.json'}")
    key_maps = check_checkpoint(model, shards, model_dir)  # headers only, before any weight is read
    targets = set(resolve_targets(model, target_modules))
    return LoadPlan(model_dir, model, shards, key_maps, targets, _tied_groups(model), settings, device)


def finish_load(plan: LoadPlan) -> nn.Module:
    """Buffers onto the device, every parameter frozen, eval mode, and the load's record on the model."""
    model, device = plan.model, plan.device
    for module in model.modules():
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
    model.requires_grad_(False)
    model.eval()
    model.config.name_or_path = str(plan.model_dir)
    model.qlora_quant = plan.settings
    model.qlora_targets = sorted(plan.targets)
    return model


def load_quantized(
    model_path: str | Path,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    device: str | torch.device | None = None,
    target_modules: TargetSpec = "all-linear",
    *,
    blocksize: int = 64,
    int8_threshold: float = 6.0,
    trust_remote_code: bool = False,
    load_tokenizer: bool = True,
):
    """Load a Hugging Face causal LM with its targeted linear layers quantized; returns (model, tokenizer).

    Targeted weights become frozen bitsandbytes 4-bit (nf4/fp4, optional double quantization) or 8-bit
    (LLM.int8) layers; everything else (embeddings, norms, lm_head) is bf16. The model is in eval mode
    with every parameter frozen; `tokenizer` is None when the directory has no tokenizer files.
    """
    plan = plan_load(
        model_path, bits, quant_type, double_quant, device, target_modules, blocksize=blocksize,
        int8_threshold=int8_threshold, trust_remote_code=trust_remote_code, load_tokenizer=load_tokenizer,
    )  # fmt: skip
    model, model_dir, device, targets, tied = plan.model, plan.model_dir, plan.device, plan.targets, plan.tied
    release_freed = malloc_trim()
    stashed_bias: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()

    def quantized_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        if bits == 4:
            packed, state = quant.quantize_4bit(weight, quant_type, double_quant, blocksize)
            return quant.make_linear4bit(packed, state, bias, quant_type, double_quant, blocksize)
        codes, scales = quant.quantize_8bit(weight)
        return quant.make_linear8bit(codes, scales, bias, int8_threshold)

    for shard, key_map in zip(plan.shards, plan.key_maps):
        for key in shard.keys():
            name = key_map.get(key)
            if name is None:
                continue  # legacy tensors transformers also ignores (attention masks, per-layer rotary tables)
            module_path, _, attr = name.rpartition(".")
            floating = shard.dtype(key).is_floating_point
            tensor = shard.read(key, quant.COMPUTE_DTYPE if floating else None)
            if module_path in targets:
                original = model.get_submodule(module_path)
                if attr == "bias":
                    if module_path in replaced:
                        original.bias = nn.Parameter(tensor.to(device), requires_grad=False)
                    else:
                        stashed_bias[module_path] = tensor
                    continue
                if attr != "weight":
                    continue
                weight = tensor.t() if is_conv1d(original) else tensor  # Conv1D stores [in, out]
                has_bias = getattr(original, "bias", None) is not None
                bias = stashed_bias.pop(module_path, None)
                if has_bias and bias is None:
                    bias = torch.empty(weight.shape[0], dtype=quant.COMPUTE_DTYPE, device="meta")
                layer = quantized_layer(
                    weight.to(device), bias.to(device) if bias is not None and bias.device.type != "meta" else bias
                )
                parent_path, _, child = module_path.rpartition(".")
                setattr(model.get_submodule(parent_path), child, layer)
                replaced.add(module_path)
                del weight, tensor
                release_freed()
            else:
                _set_tensor(model, name, tensor.to(device))

    for names in tied:
        source = next((p for p in (model.get_parameter(n) for n in names) if p.device.type != "meta"), None)
        for n in names if source is not None else []:
            module_path, _, attr = n.rpartition(".")
            model.get_submodule(module_path)._parameters[attr] = source

    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [t for t in targets if t not in replaced]
    if missing:
        raise ModelLoadError(
            f"the checkpoint in {model_dir} has no tensor for {missing[0]} ({len(missing)} missing in all); "
            "the weights do not belong to this config.json."
        )
    finish_load(plan)
    tokenizer = load_tokenizer_from(model_dir, trust_remote_code) if load_tokenizer else None
    return model, tokenizer


def load_tokenizer_from(model_dir: Path, trust_remote_code: bool = False):
    """The directory's tokenizer, or None when it ships none; malformed tokenizer files raise a `DataError`."""
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    check_tokenizer_files(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:  # the tokenizers library raises a bare Exception for a tokenizer.json it cannot parse
        raise DataError(
            f"the tokenizer in {model_dir} cannot be loaded ({_first_sentence(exc, 160)}); fix or re-download its files."
        ) from None
