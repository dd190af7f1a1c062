"""What `qlora-lite doctor` learns about the machine, one replaceable function each (`Probes`): torch.cuda,
importlib, package metadata, nvidia-smi, the CUDA driver, host memory, the 4-bit kernel check, transformers'
attention pick and the memory model's presets. The defaults are the real ones; tests replace them to fake a GPU.

The kernel check is real on either device: a small NF4 matmul through bitsandbytes (one row: the inference
kernel; 16 rows with backward: the training path) against an fp32 matmul with the dequantized weight, plus the
NF4 round trip of the weight itself and, on a GPU, the dequantized weight against the CPU's from the same bytes.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The kernel check: a [OUT, IN] NF4 weight (double quantization, blocksize 64, as training quantizes) times ROWS rows.
KERNEL_OUT, KERNEL_IN, KERNEL_ROWS = 256, 512, 16
# bf16 outputs round to 2^-9 relative (~2e-3 measured on the CPU); a wrong kernel is off by far more.
KERNEL_TOLERANCE = 1e-2
# NF4 keeps 4 bits per weight: ~0.09 relative error on normal weights (measured); broken (de)quantization is ~1.
ROUND_TRIP_LIMIT = 0.15

# ------------------------------------------------------------------------------------------ probes


@dataclass
class KernelResult:
    """What the 4-bit kernel check measured (relative errors, as ||got - reference|| / ||reference||)."""

    device: str
    forward_error: float  # bitsandbytes' matmul_4bit vs x @ dequantize(W).T in fp32, worst of 1 and 16 rows
    backward_error: float  # the input gradient vs grad @ dequantize(W) in fp32
    round_trip_error: float  # dequantize(quantize(W)) vs W
    cpu_dequant_error: float | None  # the device's dequantized weight vs the CPU's from the same bytes (GPU only)
    seconds: float


def _relative_error(got: Any, reference: Any) -> float:
    got, reference = got.float(), reference.float()
    return ((got - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def nf4_kernel_check(device: str = "cpu", matmul: Callable | None = None) -> KernelResult:
    """Run a small NF4 matmul (forward and backward) through bitsandbytes on `device` and measure it against an
    fp32 dequantize-then-matmul reference. `matmul` replaces `bitsandbytes.matmul_4bit` (tests fake a bad kernel)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch

    from ..model.quant import quantize_4bit

    start = time.perf_counter()
    matmul = matmul or bnb.matmul_4bit
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(KERNEL_OUT, KERNEL_IN, generator=gen)
    x = torch.randn(KERNEL_ROWS, KERNEL_IN, generator=gen).to(device, torch.bfloat16)
    grad_out = torch.randn(KERNEL_ROWS, KERNEL_OUT, generator=gen).to(device, torch.bfloat16)
    packed, state = quantize_4bit(weight.to(device), "nf4", double_quant=True)
    dequantized = bnbf.dequantize_4bit(packed, state).float()
    forward_errors, rows_input, out = [], None, None
    for rows in (1, KERNEL_ROWS):  # one row: the inference (gemv) kernel on CUDA; several rows: training's path
        rows_input = x[:rows].clone().requires_grad_(rows > 1)
        out = matmul(rows_input, packed.t(), quant_state=state)
        forward_errors.append(_relative_error(out, rows_input.detach().float() @ dequantized.t()))
    forward = math.nan if any(math.isnan(e) for e in forward_errors) else max(forward_errors)  # max() drops NaN
    out.backward(grad_out)
    backward = _relative_error(rows_input.grad, grad_out.float() @ dequantized)
    round_trip = _relative_error(dequantized, weight.to(device))
    cpu_error = None
    if torch.device(device).type != "cpu":
        state.to("cpu")  # QuantState.to moves the state in place; nothing on the device needs it any more
        cpu_error = _relative_error(dequantized.cpu(), bnbf.dequantize_4bit(packed.cpu(), state))
    return KernelResult(str(device), forward, backward, round_trip, cpu_error, time.perf_counter() - start)


def _torch_cuda() -> Any:
    import torch

    return torch.cuda


def _torch_cuda_version() -> str | None:
    import torch

    return torch.version.cuda


def _distribution_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _nvidia_smi() -> str | None:
    """nvidia-smi's summary (its header names the driver and the CUDA version it supports); None without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    return done.stdout if done.returncode == 0 else f"nvidia-smi failed: {(done.stdout + done.stderr).strip()}"


def _cuda_driver_api() -> int | None:
    """The CUDA version the driver supports (12040 for 12.4) from libcuda itself; None without a driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    value = ctypes.c_int(0)
    return value.value if lib.cuDriverGetVersion(ctypes.byref(value)) == 0 else None


def _host_memory() -> tuple[int, int] | None:
    """(available, total) bytes of host RAM."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except (OSError, ValueError, AttributeError):
        return None


def _default_attention() -> str:
    """The attention implementation transformers picks for a Llama-style model here (qlora-lite keeps its pick)."""
    from ..model.loader import build_skeleton
    from ..model.tiny import tiny_config

    return getattr(build_skeleton(tiny_config()).config, "_attn_implementation", None) or "eager"


def _preset_names() -> list[str]:
    from ..memory.inventory import preset_names

    return preset_names()


def _preset_memory(name: str) -> tuple[int, int]:
    """(peak GPU bytes, parameters) of training a preset at `qlora-lite train`'s default settings."""
    from ..memory.report import estimate_memory

    report = estimate_memory(name)
    return report.total, report.details["parameters"]


def _default_settings() -> str:
    from ..memory.settings import RunSettings

    s = RunSettings()
    return f"{s.bits}-bit {s.quant_type}, r={s.rank}, seq {s.seq_len} x micro-batch {s.batch_size}"


@dataclass
class Probes:
    """Everything the checks learn about the machine, one replaceable function each (tests fake a GPU here)."""

    cuda: Callable[[], Any] = _torch_cuda  # torch.cuda, or anything with the same functions
    torch_cuda_version: Callable[[], str | None] = _torch_cuda_version  # torch.version.cuda
    import_module: Callable[[str], Any] = importlib.import_module
    distribution_version: Callable[[str], str | None] = _distribution_version
    nvidia_smi: Callable[[], str | None] = _nvidia_smi
    cuda_driver_api: Callable[[], int | None] = _cuda_driver_api
    host_memory: Callable[[], tuple[int, int] | None] = _host_memory
    kernel_check: Callable[[str], KernelResult] = nf4_kernel_check
    default_attention: Callable[[], str] = _default_attention
    preset_names: Callable[[], list[str]] = _preset_names
    preset_memory: Callable[[str], tuple[int, int]] = _preset_memory
    default_settings: Callable[[], str] = _default_settings
