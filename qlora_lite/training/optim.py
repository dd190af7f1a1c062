"""The adapter optimizer: fp32 master weights behind bf16 adapters, so no update is lost to bf16 rounding.

A and B live in bf16 (what the forward multiplies by). The optimizer owns an fp32 master copy of each: one flat
fp32 buffer of all trainable tensors, the masters being views into it. Gradients go the same way: after each
micro-batch `accumulate_grads` adds the bf16 gradients into one flat fp32 gradient buffer (allocated at the first
micro-batch of a step, dropped after the step; each master's `.grad` is its view), so a step clips by one norm,
data parallel sums one buffer in place, and the inner optimizer (bitsandbytes 8-bit AdamW, its paged variant on
CUDA, or torch AdamW) updates the flat buffer in one call; the masters are then rounded back into the bf16
parameters. An update smaller than bf16's spacing therefore accumulates in the master instead of vanishing.

The flat layout's consequences: fp32 parameters get an fp32 master copy like the others; a tensor without a gradient
in a step contributes zeros (AdamW still decays its moments); bitsandbytes quantizes the 8-bit state in 256-value
blocks over the flat buffer (a block may span two tensors). Tensors below bitsandbytes' min_8bit_size (4096 values),
for which it keeps fp32 state because 8-bit is too coarse for them, sit at the end of the buffer in a part of their
own with fp32 state, updated by a second call. Parameters sharded by FSDP2 (DTensors) keep one master per local shard
(an fp32 shard is its own), each its own inner parameter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from ..errors import ConfigError
from ..memory.constants import BNB_8BIT_MIN_SIZE  # bitsandbytes' own split, which the memory model counts too

OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw")


def resolve_optimizer_name(name: str, device: torch.device) -> str:
    """Paged optimizers need CUDA; elsewhere paged_adamw_8bit falls back to adamw_8bit."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer {name!r} is not supported; use one of {', '.join(OPTIMIZERS)}.")
    if name == "paged_adamw_8bit" and device.type != "cuda":
        return "adamw_8bit"
    return name


def _inner_optimizer(
    name: str, params: list[torch.Tensor], lr: float, weight_decay: float, betas, eps, fp32_state: bool = False
):
    """torch AdamW, or bitsandbytes' (paged) 8-bit AdamW; `fp32_state`: its unpaged fp32-state path (bitsandbytes' own
    choice for tensors below min_8bit_size)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
    if fp32_state:
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=2**62)
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a view of its storage); any other tensor itself."""
    return t.to_local() if type(t).__name__ == "DTensor" else t


class AdapterOptimizer:
    """AdamW over fp32 master copies of (usually bf16) trainable parameters, held in one flat buffer.

    `param_groups` are the inner optimizers', so schedules set `group["lr"]` as usual. `masters` are per-tensor
    views of the flat fp32 buffer `flat`. Parameters sharded by FSDP2 (DTensors) are updated through their local
    shards, one master each (bitsandbytes' 8-bit update has no DTensor rule; `flat` is None), and the gradient norm
    is summed over the shard group.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        name: str = "adamw_8bit",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ConfigError("there are no trainable parameters; apply LoRA before building the optimizer.")
        self.name = resolve_optimizer_name(name, self.params[0].device)
        self.sharded = any(type(p).__name__ == "DTensor" for p in self.params)
        self.layout = "per-tensor" if self.sharded else "flat"
        self.flat: torch.Tensor | None = None  # the flat fp32 master storage (None when sharded)
        self._grad: torch.Tensor | None = None  # the step's flat fp32 gradient; None until a micro-batch adds to it
        self._grad_views: list[torch.Tensor] = []
        self._parts: list[tuple[int, int]] = []  # [start, end) of each inner parameter in the flat buffer
        self._inner_params: list[torch.Tensor] = []  # those parameters: leaves sharing the flat buffer's storage
        with torch.no_grad():
            self.locals = [_local(p) for p in self.params]
            if self.sharded:  # an fp32 shard is its own master; a lower-precision one gets an fp32 copy
                self.masters = [
                    t if t.dtype == torch.float32 else t.detach().float().clone().requires_grad_(True)
                    for t in self.locals
                ]
                inners = [_inner_optimizer(self.name, self.masters, lr, weight_decay, betas, eps)]
            else:
                inners = self._build_flat(lr, weight_decay, betas, eps)
        self.inners = inners

    def _build_flat(self, lr: float, weight_decay: float, betas, eps) -> list:
        """The flat masters and the inner optimizers over its parts. bitsandbytes keeps fp32 state for tensors below
        its min_8bit_size (8-bit state is too coarse for them): those go last, in a part of their own with fp32
        state, as each had before."""
        numels = [t.numel() for t in self.locals]
        small = [i for i, n in enumerate(numels) if n < BNB_8BIT_MIN_SIZE] if self.name != "adamw" else []
        order = [i for i, n in enumerate(numels) if i not in small] + small  # small is short: the ones below 4096
        self._offsets = [0] * len(numels)
        offset = 0
        for i in order:
            self._offsets[i] = offset
            offset += numels[i]
        self.flat = torch.empty(offset, dtype=torch.float32, device=self.locals[0].device)
        self.masters = self._views(self.flat)
        torch._foreach_copy_(self.masters, [t.detach() for t in self.locals])
        split = offset - sum(numels[i] for i in small)
        self._parts = [(a, b) for a, b in ((0, split), (split, offset)) if b > a]
        self._inner_params = [self.flat[a:b].requires_grad_(True) for a, b in self._parts]
        return [
            _inner_optimizer(self.name, [part], lr, weight_decay, betas, eps, fp32_state=a >= split)
            for part, (a, _) in zip(self._inner_params, self._parts)
        ]

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's view of a flat buffer, at its offset."""
        return [flat[o : o + t.numel()].view(t.shape) for o, t in zip(self._offsets, self.locals)]

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizers' parameter groups (`lr`, `betas`, `eps`, `weight_decay`), so schedules set `lr`."""
        return [group for inner in self.inners for group in inner.param_groups]

    def zero_grad(self) -> None:
        """Drop the gradients of the parameters and of their masters (the flat gradient buffer is freed)."""
        for p in self.params:
            p.grad = None
        if self.flat is None:
            for m in self.masters:
                m.grad = None
            return
        if self._grad is not None:
            for m in self.masters:  # the views keep the buffer alive
                m.grad = None
            self._grad, self._grad_views = None, []
        for part in self._inner_params:
            part.grad = None

    def _flat_grad(self) -> torch.Tensor:
        """The step's flat fp32 gradient, allocated as zeros at its first use (a tensor never given a gradient in
        the step contributes zeros) and shown as each master's `.grad`."""
        if self._grad is None:
            self._grad = torch.zeros_like(self.flat)
            self._grad_views = self._views(self._grad)
            for m, g in zip(self.masters, self._grad_views):
                m.grad = g
        return self._grad

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add the parameters' gradients into the fp32 gradients of the masters and clear them.

        Called after each micro-batch's backward, so gradient accumulation sums in fp32, not in bf16.
        """
        if self.flat is None:
            for p, m in zip(self.params, self.masters):
                if m is not p and p.grad is not None:
                    g = _local(p.grad).float()
                    m.grad = g if m.grad is None else m.grad.add_(g)
                    p.grad = None
            return
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            return
        self._flat_grad()
        pairs = [(v, g) for v, g in zip(self._grad_views, grads) if g is not None]
        torch._foreach_add_([v for v, _ in pairs], [g for _, g in pairs])  # fp32 += bf16, computed in fp32
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def sum_grads(self, all_reduce: Callable[[torch.Tensor], None], *scalars: float) -> list[float]:
        """Sum the fp32 master gradients over the ranks with `all_reduce`, in place in the flat gradient buffer (a
        master without a gradient contributes zeros), then `scalars` in a second small `all_reduce`; return the
        summed scalars.

        Once per optimizer step, before clipping: fp32 adapter bytes move once, not bf16 bytes every micro-batch.
        Sharded (FSDP2) gradients were already summed by its reduce-scatter: only `scalars` are.
        """
        self.accumulate_grads()
        device = self.masters[0].device
        if self.flat is not None:
            all_reduce(self._flat_grad())  # every rank joins with the same buffer, zeros where it had no gradient
        summed = torch.tensor(scalars, dtype=torch.float32, device=device)
        if self.flat is None or scalars:
            all_reduce(summed)
        return summed.tolist()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Total fp32 gradient norm of the masters; scales the gradients to `max_norm` if above it (0: no clip)."""
        self.accumulate_grads()
        if self.flat is not None:
            grads = [] if self._grad is None else [self._grad]
        else:
            grads = [m.grad for m in self.masters if m.grad is not None]
        if not grads:
            return 0.0
        norms = [torch.linalg.vector_norm(g) for g in grads]
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        if self.sharded:  # the shards of the group hold the whole gradient once between them
            import torch.distributed as dist

            squared = total.square()
            mesh = next(p.device_mesh for p in self.params if type(p).__name__ == "DTensor")
            dist.all_reduce(squared, group=mesh.get_group(mesh.ndim - 1))
            total = squared.sqrt()
        if max_norm > 0:
            scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(scale)
        return float(total)

    @torch.no_grad()
    def step(self) -> None:
        """Move gradients to the fp32 masters, update them, round them back into the parameters, drop the gradients."""
        self.accumulate_grads()
        for part, (a, b) in zip(self._inner_params, self._parts):
            part.grad = None if self._grad is None else self._grad[a:b]  # None: the inner optimizer skips it
        for inner in self.inners:
            inner.step()
        self._copy_back()
        self.zero_grad()

    def _copy_back(self) -> None:
        if self.flat is not None:
            torch._foreach_copy_(self.locals, self.masters)  # one call rounding every master into its parameter
            return
        for t, m in zip(self.locals, self.masters):
            if m is not t:
                t.copy_(m)

    def state_dict(self) -> dict:
        """Inner optimizer state, its layout ("flat", or "per-tensor" when sharded) and the fp32 masters, one per
        tensor (needed for an exact resume)."""
        return {
            "name": self.name,
            "layout": self.layout,
            "inner": [inner.state_dict() for inner in self.inners],
            "masters": [m.detach().clone() for m in self.masters],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; the parameters are set from the masters.

        Raises `ConfigError` for a state of another optimizer or number of tensors, or of another layout (a checkpoint
        written before the flat layout holds one inner state per tensor).
        """
        saved = state["masters"]
        if state.get("name") != self.name or len(saved) != len(self.masters):
            raise ConfigError(
                f"the checkpoint's optimizer ({state.get('name')}, {len(saved)} tensors) does not match this run "
                f"({self.name}, {len(self.masters)} tensors); resume with the same optimizer and LoRA settings."
            )
        layout = state.get("layout", "per-tensor")  # written before the flat layout: no key, one state per tensor
        if layout != self.layout:
            why = " (written before qlora-lite kept it in one flat buffer)" if layout == "per-tensor" else ""
            raise ConfigError(
                f"the checkpoint's optimizer state is laid out {layout}{why} but this run's is {self.layout}; resume it "
                "with the qlora-lite version and train.fsdp setting that wrote it, or start the run again."
            )
        inner = state["inner"] if isinstance(state["inner"], list) else [state["inner"]]
        if len(inner) != len(self.inners):
            raise ConfigError(
                f"the checkpoint's optimizer has {len(inner)} inner state(s), this run's {len(self.inners)}; resume "
                "with the same optimizer and LoRA settings."
            )
        for m, t in zip(self.masters, saved):
            m.copy_(t.to(m.device))
        self._copy_back()
        for opt, saved_inner in zip(self.inners, inner):
            opt.load_state_dict(saved_inner)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the optimizer holds: the flat master (or the masters that are copies), and the inner state."""
        if self.flat is not None:
            tensors = [self.flat]
        else:
            tensors = [m for m, t in zip(self.masters, self.locals) if m is not t]
        for inner in self.inners:
            for per_param in inner.state.values():
                tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
        return tensors
