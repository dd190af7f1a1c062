"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for a 4-bit QLoRA model: each decoder layer and then the root are
sharded over the ranks of a node (HSDP across nodes: a ("replicate", "shard") mesh), so every rank holds 1/N of the
packed 4-bit weights, the bf16 norms and embeddings and the LoRA adapters.

- `shard_model`: shards a model that is already built (loaded whole, or a meta skeleton `load_sharded` fills).
- `load_sharded`: the base and its LoRA built so that each rank only ever holds its own shard of each weight plus
  one full tensor at a time (the one being read and quantized), so per-rank memory falls with the world size.
- `full_adapter_state`: the adapter gathered into whole tensors, as `adapter_state_dict` gives them unsharded.

Numerics: the quantization state (absmax, code tables) stays replicated on every rank and bitsandbytes restores it
from `module.quant_state` when FSDP has swapped the Params4bit for a plain parameter. The LoRA parameters are fp32
under FSDP: a `MixedPrecisionPolicy` all-gathers them in the adapter dtype (bf16, whose values they hold exactly)
for the forward, and reduce-scatters their gradients in fp32 summed over the ranks (divide factor 1: the loss is
already divided by the step's target count over all ranks). One micro-batch per rank therefore gives the gradient
of one process accumulating the same micro-batches' bf16 gradients in fp32. The policy leaves the uint8 packed
weights (not floating point) and the bf16 norms and embeddings (already bf16) as they are, and casts no inputs.

The root unit (embeddings, final norm, lm_head) is gathered by the root's forward; `training/loss`'s chunked loss
calls `model.base_model` and reads `lm_head.weight` without it, so that call is routed through the root's forward too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config.settings import LoraConfig, QuantConfig
from ..errors import ConfigError, ModelLoadError
from ..io.heap import malloc_trim
from ..model import loader, quant
from ..model.lora import adapter_state_dict, apply_lora, linear_dims, lora_layers
from ..model.targets import decoder_layers
from .distributed import World

MESH_DIMS = ("replicate", "shard")
EIGHT_BIT = (
    "FSDP shards 4-bit bases only (bitsandbytes' 8-bit layers lose their quantization state when sharded); "
    "set quant.bits: 4, or train.fsdp: false to replicate the 8-bit base on every rank."
)


def _check_shardable(model: nn.Module) -> None:
    import bitsandbytes as bnb

    if any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()):
        raise ConfigError(EIGHT_BIT)
    lora = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)}
    whole = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora]
    if whole:
        raise ConfigError(
            f"FSDP trains LoRA adapters only, but {whole[0]} is trainable too (lora.modules_to_save or new tokens); "
            "remove lora.modules_to_save and data.add_special_tokens, or set train.fsdp: false."
        )
    if not decoder_layers(model):
        raise ConfigError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules) and has no model.layers, so "
            "FSDP cannot shard it layer by layer; set train.fsdp: false."
        )


def device_mesh(world: World, device: torch.device):
    """The data-parallel mesh: ("shard",) over the whole world on one node; ("replicate", "shard") with one row per
    node when the world spans several (HSDP: shard within a node, replicate across nodes)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ConfigError("FSDP needs the process group of a torchrun launch; start the run with torchrun.")
    if world.nodes > 1:
        return init_device_mesh(device.type, (world.nodes, world.size // world.nodes), mesh_dim_names=MESH_DIMS)
    return init_device_mesh(device.type, (world.size,), mesh_dim_names=MESH_DIMS[1:])


def _adapter_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)}
    if len(dtypes) > 1:
        raise ConfigError(
            f"the LoRA adapters mix dtypes {sorted(map(str, dtypes))}; apply LoRA with one adapter_dtype."
        )
    return dtypes.pop() if dtypes else torch.float32


def shard_model(model: nn.Module, world: World, device: torch.device):
    """Shard `model` in place with FSDP2 (each decoder layer, then the root) and return the device mesh.

    The LoRA parameters become fp32 (their bf16 values are exact in fp32) and are all-gathered in their former
    dtype for the forward; gradients are reduced in fp32 and summed over the ranks, not averaged. Raises
    `ConfigError` for a model with 8-bit layers, one that trains more than LoRA adapters, or one without decoder
    layers to shard. Call it on every rank, after `apply_lora` and before the optimizer is built; activation
    checkpointing may be enabled before or after.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    _check_shardable(model)
    device = torch.device(device)
    mesh = device_mesh(world, device)
    adapter_dtype = _adapter_dtype(model)
    for layer in lora_layers(model).values():
        layer.lora_A.to(torch.float32)
        layer.lora_B.to(torch.float32)
    for module in model.modules():  # layers built before quant.make_linear4bit recorded the state on the module
        if quant.is_quantized_linear(module) and getattr(module, "quant_state", None) is None:
            module.quant_state = getattr(module.weight, "quant_state", None)
    policy = MixedPrecisionPolicy(
        param_dtype=None if adapter_dtype == torch.float32 else adapter_dtype,
        reduce_dtype=torch.float32,
        cast_forward_inputs=False,  # autocast decides the compute dtype, as in one process
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    _route_base_model_calls(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: the loss is already divided by the step's target count
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM); no divide by 1
    model.qlora_fsdp_adapter_dtype = adapter_dtype
    return mesh


def _route_base_model_calls(model: nn.Module) -> None:
    """Make a call of `model.base_model` on its own (the chunked loss: `training/loss.causal_lm_loss` runs the base
    model, then `lm_head`'s weight chunk by chunk) a forward of the FSDP root, so the root's parameters (embeddings,
    final norm, lm_head) are gathered for it and resharded after backward as in `model(...)`. Inside `model(...)` the
    base model runs as it is. `register_fsdp_forward_method` is torch's way to make a method a root forward."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    base = getattr(model, "base_model", model)
    if base is model or not isinstance(base, nn.Module):
        return
    own_forward = base.forward
    in_root_forward = [False]

    def entered(module, args):
        in_root_forward[0] = True

    def left(module, args, output):
        in_root_forward[0] = False

    model.register_forward_pre_hook(entered)
    model.register_forward_hook(left, always_call=True)
    model.qlora_base_forward = lambda *args, **kwargs: own_forward(*args, **kwargs)
    register_fsdp_forward_method(model, "qlora_base_forward")
    as_root = model.qlora_base_forward

    def forward(*args, **kwargs):
        return own_forward(*args, **kwargs) if in_root_forward[0] else as_root(*args, **kwargs)

    base.forward = forward


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of a sharded model gathered whole, with `adapter_state_dict`'s keys and the adapters'
    dtype before sharding (what one process would save). A collective: every rank calls it; each gets the tensors."""
    from torch.distributed.tensor import DTensor

    dtype = getattr(model, "qlora_fsdp_adapter_dtype", None)
    state = {}
    for key, tensor in adapter_state_dict(model).items():
        tensor = tensor.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[key] = tensor if dtype is None else tensor.to(dtype)
    return state


def _local_chunk(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` as the DTensor `param` places it (FSDP2 chunks like torch.chunk, empty past the
    last chunk; replicated mesh dimensions keep the whole)."""
    from torch.distributed.tensor import Shard

    mesh, part = param.device_mesh, full
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            chunks = torch.chunk(part, mesh.size(mesh_dim), dim=placement.dim)
            index = mesh.get_local_rank(mesh_dim)
            part = chunks[index] if index < len(chunks) else part.narrow(placement.dim, 0, 0)
    return part


@torch.no_grad()
def _fill(param: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor

    if tuple(full.shape) != tuple(param.shape):
        raise ModelLoadError(f"a checkpoint tensor of shape {list(full.shape)} does not fit {list(param.shape)}.")
    if isinstance(param, DTensor):
        local = param.to_local()
        local.copy_(_local_chunk(full, param).reshape(local.shape))
    else:
        param.copy_(full)


def _device_hints(layers: list[nn.Module], device: torch.device) -> None:
    # LoraLinear creates A and B on its base layer's device, the CPU when every base parameter is on the meta
    # device; a zero-size parameter on `device` makes them (and their random init) what one process gets there.
    for layer in layers:
        layer.register_parameter("_qlora_device", nn.Parameter(torch.empty(0, device=device), requires_grad=False))


def _drop_device_hints(layers: list[nn.Module]) -> None:
    for layer in layers:
        layer._parameters.pop("_qlora_device", None)


def load_sharded(
    model_path: str | Path,
    world: World,
    device: torch.device,
    quant_settings: QuantConfig,
    lora_settings: LoraConfig,
    *,
    seed: int | None = None,
    trust_remote_code: bool = False,
):
    """The 4-bit base with LoRA, sharded with FSDP2 while it loads; returns (model, device mesh).

    What `load_quantized` + `apply_lora` + `shard_model` give, without any rank holding the whole base: the
    skeleton's quantized layers get packed weights on the meta device, LoRA is applied (A and B drawn from the RNG
    seeded with `seed`, in module order, on `device`, exactly as in one process), the model is sharded, each rank
    allocates only its shards, and then every checkpoint tensor is read, quantized (targeted weights, exactly as
    the loader does) and this rank's chunk copied into its shard; the quantization state is kept whole on each
    module. Only one full tensor is in memory at a time. `lora_settings.target_modules` chooses both the quantized
    and the adapted layers, as `training/setup.prepare_run` does. Call it on every rank of a started process group.
    """
    if quant_settings.bits != 4:
        raise ConfigError(EIGHT_BIT)
    if lora_settings.modules_to_save:
        raise ConfigError(
            "FSDP trains LoRA adapters only, so lora.modules_to_save cannot be used with it; remove "
            "lora.modules_to_save, or set train.fsdp: false."
        )
    device = torch.device(device)
    q, lc = quant_settings, lora_settings
    plan = loader.plan_load(
        model_path, q.bits, q.quant_type, q.double_quant, device, lc.target_modules, blocksize=q.blocksize,
        int8_threshold=q.int8_threshold, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    model = plan.model
    conv1d: set[str] = set()
    for path in plan.targets:
        original = model.get_submodule(path)
        if loader.is_conv1d(original):
            conv1d.add(path)
        in_f, out_f = linear_dims(original)
        layer = quant.empty_linear4bit(
            out_f, in_f, getattr(original, "bias", None) is not None, q.quant_type, q.double_quant, q.blocksize
        )
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    loader.finish_load(plan)
    layers = [model.get_submodule(path) for path in plan.targets]
    _device_hints(layers, device)
    try:
        apply_lora(
            model, lc.r, lc.alpha, lc.dropout, lc.target_modules, rslora=lc.rslora,
            adapter_dtype=getattr(torch, lc.adapter_dtype), seed=seed,
        )  # fmt: skip
    finally:
        _drop_device_hints(layers)
    mesh = shard_model(model, world, device)
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)  # this rank's shards only
    _load_shards(model, plan, conv1d, device)
    return model, mesh


def _load_shards(model: nn.Module, plan: loader.LoadPlan, conv1d: set[str], device: torch.device) -> None:
    """Read each checkpoint tensor once, quantize the targeted weights, and copy this rank's chunk into its shard."""
    q = plan.settings
    found = {name for key_map in plan.key_maps for name in key_map.values()}
    first: dict[str, str] = {}  # a tied group loads once, from its first name the checkpoint holds
    for names in plan.tied:
        present = [n for n in names if n in found] or names
        first.update({n: present[0] for n in names})
    wrapped = {path: layer.base_layer for path, layer in lora_layers(model).items()}
    release_freed = malloc_trim()
    filled: set[str] = set()
    for shard, key_map in zip(plan.shards, plan.key_maps):
        for key in shard.keys():
            name = key_map.get(key)
            if name is None or first.get(name, name) != name:
                continue  # ignored legacy tensors; a tied parameter loads once
            module_path, _, attr = name.rpartition(".")
            floating = shard.dtype(key).is_floating_point
            tensor = shard.read(key, quant.COMPUTE_DTYPE if floating else None)
            if module_path in plan.targets and attr == "weight":
                layer = wrapped.get(module_path) or model.get_submodule(module_path)
                weight = tensor.t() if module_path in conv1d else tensor
                packed, state = quant.quantize_4bit(weight.to(device), q.quant_type, q.double_quant, q.blocksize)
                _fill(layer.weight, packed)
                layer.quant_state = state
                if getattr(layer.weight, "quant_state", False) is None:  # still a Params4bit (not sharded)
                    layer.weight.quant_state = state
                del packed, weight
            else:
                owner = wrapped.get(module_path) or model.get_submodule(module_path)
                if attr in owner._parameters:
                    _fill(owner._parameters[attr], tensor)
                else:
                    owner._buffers[attr] = tensor.to(device)
            filled.add(name)
            del tensor
            release_freed()
    loaded = filled | {n for n, source in first.items() if source in filled}
    missing = [
        n for n, _ in model.named_parameters(remove_duplicate=False) if not _is_lora(n) and _base_name(n) not in loaded
    ]
    if missing:
        raise ModelLoadError(
            f"the checkpoint in {plan.model_dir} has no tensor for {missing[0]} ({len(missing)} missing in all); "
            "the weights do not belong to this config.json."
        )


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _base_name(name: str) -> str:
    """The skeleton's name of a parameter of the LoRA-wrapped model (`x.base_layer.weight` -> `x.weight`)."""
    return name.replace(".base_layer.", ".")


__all__ = ["decoder_layers", "device_mesh", "shard_model", "full_adapter_state", "load_sharded"]
