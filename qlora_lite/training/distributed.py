"""The process group of a torchrun launch: who this rank is, starting the group, and the few collectives a run
uses (gradient sum, agreement checks, a barrier), each bounded by `train.collective_timeout`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; without them a run is one process and nothing
here talks to anything. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError, QloraLiteError, TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the launch: global rank and size, rank and size within its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))


SINGLE = World()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"the environment variable {name} is {value!r}; torchrun sets it to a whole number."
        ) from None


def world_from_env() -> World:
    """The world torchrun describes in the environment (one process when WORLD_SIZE is unset or 1)."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return SINGLE
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    if not (0 <= rank < size and 0 <= local_rank < local_size and size % local_size == 0):
        raise ConfigError(
            f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={size}, LOCAL_WORLD_SIZE={local_size} do not describe a "
            "launch; start the run with torchrun, which sets them."
        )
    return World(rank, size, local_rank, local_size)


def device_for(world: World) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when there are GPUs, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"this node runs {world.local_size} ranks but has {torch.cuda.device_count()} GPUs; pass "
            f"--nproc_per_node {torch.cuda.device_count()} or less to torchrun."
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def start(world: World, device: torch.device, timeout_s: float) -> bool:
    """Join the process group (NCCL on CUDA, gloo on the CPU) unless it is running or the world is one process;
    True when this call started it (and `stop` should end it)."""
    if not world.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return True


def stop() -> None:
    """Leave the process group (at the end of a run, or after a failure)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class CollectiveError(TrainingError):
    """A collective with the other ranks failed: one of them stopped, or none answered within the timeout."""


def _lost(world: World, what: str, exc: BaseException) -> CollectiveError:
    # This rank now stops with its own message; torchrun's SIGTERM for the same failure (it stops every rank of a
    # node when one dies) must not replace that message with a bare interruption while it unwinds.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:200]
    return CollectiveError(
        f"rank {world.rank} of {world.size} lost the other ranks during {what} ({first}): another rank stopped "
        "(its own message says why) or did not answer within train.collective_timeout"
    )


# What gloo and NCCL say when a peer is gone or silent (they raise plain RuntimeErrors, or DistBackendError).
_LOST_PEER = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "processgroup")


def lost_peer(world: World, what: str, exc: BaseException) -> CollectiveError | None:
    """The `CollectiveError` for an exception raised inside a collective that the backend ran for us (FSDP's
    all-gather and reduce-scatter), or None when `exc` is something else (a bug, out of memory)."""
    if not world.distributed or isinstance(exc, torch.OutOfMemoryError):
        return None
    distributed_error = getattr(dist, "DistError", ())
    text = str(exc).lower()
    if isinstance(exc, distributed_error) or any(word in text for word in _LOST_PEER):
        return _lost(world, what, exc)
    return None


def all_reduce_sum(tensor: torch.Tensor, world: World, what: str) -> None:
    """Sum `tensor` over the ranks in place; `CollectiveError` when a rank is gone or the timeout passes."""
    if not world.distributed:
        return
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    except RuntimeError as exc:  # gloo and NCCL report a dead peer or a timeout as RuntimeError (DistBackendError)
        raise _lost(world, what, exc) from None


def all_gather_objects(value: Any, world: World, what: str) -> list[Any]:
    """Every rank's `value`, in rank order (small picklable objects such as RNG states)."""
    if not world.distributed:
        return [value]
    found: list[Any] = [None] * world.size
    try:
        dist.all_gather_object(found, value)
    except RuntimeError as exc:
        raise _lost(world, what, exc) from None
    return found


def gather_objects(value: Any, world: World, what: str) -> list[Any] | None:
    """Every rank's `value` in rank order on rank 0 (None on the others): per-rank optimizer shards."""
    if not world.distributed:
        return [value]
    found: list[Any] | None = [None] * world.size if world.is_main else None
    try:
        dist.gather_object(value, found, dst=0)
    except RuntimeError as exc:
        raise _lost(world, what, exc) from None
    return found


class MirroredError(QloraLiteError):
    """Raised on the other ranks when rank 0 failed a step only it runs; rank 0 prints the message, they do not."""

    mirrored = True

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_on_main(world: World, fn: Callable[[], T], what: str) -> T:
    """Run `fn` on rank 0 only and give every rank its result; when it raises a `QloraLiteError`, every other rank
    raises a `MirroredError` with the same message and exit code (so no rank waits on one that has stopped)."""
    if not world.distributed:
        return fn()
    payload: list[Any] = [None]
    failure: QloraLiteError | None = None
    if world.is_main:
        try:
            payload = [("ok", fn())]
        except QloraLiteError as exc:
            failure, payload = exc, [("error", str(exc), exc.exit_code)]
    try:
        dist.broadcast_object_list(payload, src=0)
    except RuntimeError as exc:
        raise _lost(world, what, exc) from None
    if failure is not None:
        raise failure
    if payload[0][0] == "error":
        raise MirroredError(payload[0][1], payload[0][2])
    return payload[0][1]


def barrier(world: World, what: str) -> None:
    """Wait for every rank (bounded by the collective timeout)."""
    if not world.distributed:
        return
    try:
        dist.barrier()
    except RuntimeError as exc:
        raise _lost(world, what, exc) from None
