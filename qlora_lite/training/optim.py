"""The adapter optimizer: fp32 master weights behind bf16 adapters, so no update is lost to bf16 rounding.

A and B live in bf16 (what the forward multiplies by). The optimizer owns an fp32 master copy of each;
every step copies the bf16 gradients into fp32, updates the masters with the inner optimizer
(bitsandbytes 8-bit AdamW, its paged variant on CUDA, or torch AdamW) and rounds the masters back into
the bf16 parameters. An update smaller than bf16's spacing therefore accumulates in the master instead
of vanishing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from ..errors import ConfigError

OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw")


def resolve_optimizer_name(name: str, device: torch.device) -> str:
    """Paged optimizers need CUDA; elsewhere paged_adamw_8bit falls back to adamw_8bit."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer {name!r} is not supported; use one of {', '.join(OPTIMIZERS)}.")
    if name == "paged_adamw_8bit" and device.type != "cuda":
        return "adamw_8bit"
    return name


def _inner_optimizer(name: str, params: list[torch.Tensor], lr: float, weight_decay: float, betas, eps):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a view of its storage); any other tensor itself."""
    return t.to_local() if type(t).__name__ == "DTensor" else t


class AdapterOptimizer:
    """AdamW over fp32 master copies of (usually bf16) trainable parameters.

    `param_groups` is the inner optimizer's, so schedules set `group["lr"]` as usual. Parameters sharded by FSDP2
    (DTensors) are updated through their local shards (bitsandbytes' 8-bit update has no DTensor rule), and the
    gradient norm is summed over the shard group.
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
        with torch.no_grad():
            self.locals = [_local(p) for p in self.params]
        # fp32 parameters (or shards) are their own master; lower-precision ones get an fp32 copy.
        self.masters = [
            t if t.dtype == torch.float32 else t.detach().float().clone().requires_grad_(True) for t in self.locals
        ]
        self.inner = _inner_optimizer(self.name, self.masters, lr, weight_decay, betas, eps)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self) -> None:
        """Drop the gradients of the parameters and of their masters."""
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add the parameters' gradients into fp32 gradients on the masters and clear them.

        Called after each micro-batch's backward, so gradient accumulation sums in fp32, not in bf16.
        """
        for p, m in zip(self.params, self.masters):
            if m is not p and p.grad is not None:
                g = _local(p.grad).float()
                m.grad = g if m.grad is None else m.grad.add_(g)
                p.grad = None

    @torch.no_grad()
    def sum_grads(self, all_reduce: Callable[[torch.Tensor], None], *scalars: float) -> list[float]:
        """Sum the fp32 master gradients, and `scalars`, over the ranks in one `all_reduce` of one flat fp32 buffer
        (a master without a gradient contributes zeros); return the summed scalars.

        Once per optimizer step, before clipping: fp32 adapter bytes move once, not bf16 bytes every micro-batch.
        Sharded (FSDP2) gradients were already summed by its reduce-scatter: only `scalars` are.
        """
        self.accumulate_grads()
        if self.sharded:
            flat = torch.tensor(scalars, dtype=torch.float32, device=self.masters[0].device)
            all_reduce(flat)
            return flat.tolist()
        device = self.masters[0].device
        parts = [m.grad.reshape(-1) if m.grad is not None else m.new_zeros(m.numel()) for m in self.masters]
        flat = torch.cat([*parts, torch.tensor(scalars, dtype=torch.float32, device=device)])
        del parts
        for m in self.masters:
            m.grad = None
        all_reduce(flat)
        offset = 0
        for m in self.masters:
            m.grad = flat[offset : offset + m.numel()].view_as(m)
            offset += m.numel()
        return flat[offset:].tolist()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Total fp32 gradient norm of the masters; scales the gradients to `max_norm` if above it (0: no clip)."""
        self.accumulate_grads()
        grads = [m.grad for m in self.masters if m.grad is not None]
        if not grads:
            return 0.0
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
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
        """Move gradients to the fp32 masters, update them, and round them back into the parameters."""
        self.accumulate_grads()
        self.inner.step()
        for t, m in zip(self.locals, self.masters):
            if m is not t:
                t.copy_(m)
            m.grad = None

    def state_dict(self) -> dict:
        """Inner optimizer state plus the fp32 masters (needed for an exact resume)."""
        return {
            "name": self.name,
            "inner": self.inner.state_dict(),
            "masters": [m.detach().clone() for m in self.masters],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; the parameters are set from the masters."""
        if state.get("name") != self.name or len(state["masters"]) != len(self.masters):
            raise ConfigError(
                f"the checkpoint's optimizer ({state.get('name')}, {len(state['masters'])} tensors) does not match this run "
                f"({self.name}, {len(self.masters)} tensors); resume with the same optimizer and LoRA settings."
            )
        for t, m, saved in zip(self.locals, self.masters, state["masters"]):
            m.copy_(saved.to(m.device))
            if m is not t:
                t.copy_(m)
        self.inner.load_state_dict(state["inner"])

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the optimizer holds: masters that are copies, and the inner state."""
        tensors = [m for m, t in zip(self.masters, self.locals) if m is not t]
        for per_param in self.inner.state.values():
            tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
        return tensors
