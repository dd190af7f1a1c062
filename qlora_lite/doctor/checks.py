"""`qlora-lite doctor`: is this machine ready to train, and what fits on it?

Each check is a function of a `_Context` that returns one `Check` (name, status ok / warn / fail / skip, finding,
fix). The checks run in order and share what they found (`_Context.facts`); a check that needs what an earlier
one could not find is skipped (status skip, not counted as a problem), and a check that raises becomes that
check's fail line, never a traceback.

Every look at the machine goes through `Probes`: torch.cuda (the module itself, or a fake with the same functions),
importlib, package metadata, nvidia-smi, host memory, the 4-bit kernel check, transformers' attention pick and
the memory model's presets. The defaults are the real ones; tests replace them to fake a GPU on the CPU.

The kernel check is real on either device: a small NF4 matmul through bitsandbytes (one row: the inference
kernel; 16 rows with backward: the training path) against an fp32 matmul with the dequantized weight, plus the
NF4 round trip of the weight itself and, on a GPU, the dequantized weight against the CPU's from the same bytes.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import os
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

GiB = 1 << 30
OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

# pyproject.toml's dependencies (tests/test_doctor.py checks they agree)
MINIMUM_VERSIONS = {"torch": "2.4", "transformers": "4.45", "bitsandbytes": "0.45"}
CUDA_TORCH_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cu124"
BNB_REINSTALL = "pip install --force-reinstall 'bitsandbytes>=0.45'"

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


# ------------------------------------------------------------------------------------------ checks


@dataclass
class Check:
    """One line of the doctor's output."""

    name: str
    status: str  # ok, warn, fail, or skip (could not run because an earlier check found a problem)
    finding: str
    fix: str = ""  # what to do, for a warn or a fail
    data: dict[str, Any] = field(default_factory=dict)  # the numbers behind the finding, for --json
    seconds: float = 0.0


class _Skip(Exception):
    """A check that cannot run because an earlier one did not find what it needs."""


@dataclass
class _Context:
    probes: Probes
    facts: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    def nvidia_smi(self) -> str | None:
        """nvidia-smi's output, asked once."""
        if "nvidia_smi" not in self.cache:
            self.cache["nvidia_smi"] = self.probes.nvidia_smi()
        return self.cache["nvidia_smi"]

    def need(self, key: str, why: str) -> Any:
        if key not in self.facts:
            raise _Skip(f"not run: {why}")
        return self.facts[key]


def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in match.groups()) if match else (0,)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _import_package(ctx: _Context, name: str, install: str) -> Check:
    """Import a required package and compare its version with qlora-lite's minimum."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = ctx.probes.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name not in (None, name):  # the package is there but something it imports is not
            return Check(
                name,
                FAIL,
                f"installed but does not import ({_first_line(exc)})",
                f"pip install --force-reinstall '{name}>={MINIMUM_VERSIONS[name]}' (reinstalls what it needs too)",
            )
        return Check(name, FAIL, f"{name} is not installed", install)
    except Exception as exc:  # a broken install raises anything (RuntimeError, OSError from a missing library)
        installed = ctx.probes.distribution_version(name)
        where = f" {installed}" if installed else ""
        return Check(
            name,
            FAIL,
            f"installed{where} but does not import ({_first_line(exc)})",
            f"pip install --force-reinstall '{name}>={MINIMUM_VERSIONS[name]}'",
        )
    version = str(getattr(module, "__version__", None) or ctx.probes.distribution_version(name) or "unknown")
    minimum = MINIMUM_VERSIONS[name]
    if _version_tuple(version) < _version_tuple(minimum):
        return Check(
            name, FAIL, f"{version} is older than qlora-lite needs ({minimum})", f"pip install -U '{name}>={minimum}'"
        )
    ctx.facts[name] = version
    return Check(name, OK, version, data={"version": version})


def check_torch(ctx: _Context) -> Check:
    check = _import_package(ctx, "torch", f"pip install 'torch>=2.4' (with CUDA: {CUDA_TORCH_INSTALL})")
    if check.status == OK:
        cuda = ctx.probes.torch_cuda_version()
        ctx.facts["torch_cuda"] = cuda
        check.finding += f" (built with CUDA {cuda})" if cuda else " (CPU-only build)"
        check.data["cuda"] = cuda
    return check


def check_transformers(ctx: _Context) -> Check:
    return _import_package(ctx, "transformers", "pip install 'transformers>=4.45'")


def check_bitsandbytes(ctx: _Context) -> Check:
    ctx.need("torch", "torch does not import")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices at import
    return _import_package(ctx, "bitsandbytes", "pip install 'bitsandbytes>=0.45'")


def check_peft(ctx: _Context) -> Check:
    version = ctx.probes.distribution_version("peft")
    if version is None:
        return Check(
            "peft",
            OK,
            "not installed (optional: qlora-lite writes PEFT-format adapters without it; install it to load them with peft)",
        )
    return Check("peft", OK, version, data={"version": version})


def _smi_versions(text: str | None) -> tuple[str | None, str | None]:
    """(driver version, CUDA version the driver supports) from nvidia-smi's header."""
    if not text:
        return None, None
    driver = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)


def check_gpu(ctx: _Context) -> Check:
    torch_version = ctx.need("torch", "torch does not import")
    cuda = ctx.probes.cuda()
    if not cuda.is_available():
        ctx.facts["device"] = "cpu"
        smi = ctx.nvidia_smi()
        driver, driver_cuda = _smi_versions(smi)
        built = ctx.facts.get("torch_cuda")
        seen = (
            "nvidia-smi not found"
            if smi is None
            else f"nvidia-smi reports driver {driver} for CUDA {driver_cuda}"
            if driver
            else smi.strip().splitlines()[0]
        )
        if built is None and driver:
            finding = (
                f"torch {torch_version} is a CPU-only build, so the GPU goes unused ({seen}): training runs on the "
                "CPU, very slowly"
            )
            fix = f"install a CUDA build of torch: {CUDA_TORCH_INSTALL}"
        elif built is None:
            finding = f"no CUDA GPU (torch {torch_version} is a CPU-only build; {seen}): training runs on the CPU, very slowly"
            fix = f"install a CUDA build of torch: {CUDA_TORCH_INSTALL}"
        else:
            finding = f"no CUDA GPU visible to torch {torch_version} (CUDA {built}; {seen}): training runs on the CPU, very slowly"
            if driver_cuda and _version_tuple(driver_cuda) < _version_tuple(built):
                fix = f"update the NVIDIA driver to one for CUDA {built} or newer, or install a torch build for CUDA {driver_cuda}"
            elif driver:
                fix = "check CUDA_VISIBLE_DEVICES (empty or -1 hides the GPUs) and that no other error shows in nvidia-smi"
            else:
                fix = "install the NVIDIA driver (nvidia-smi should then list the GPU), or use a machine with an NVIDIA GPU"
        return Check("gpu", WARN, finding, fix, data={"device": "cpu", "nvidia_smi": smi is not None})
    index = cuda.current_device()
    count = cuda.device_count()
    name = cuda.get_device_name(index)
    capability = tuple(cuda.get_device_capability(index))
    free, total = cuda.mem_get_info(index)
    ctx.facts.update(device="cuda", gpu_name=name, capability=capability, gpu_free=free, gpu_total=total)
    more = f"; {count} GPUs, device {index} checked" if count > 1 else ""
    cc = f"{capability[0]}.{capability[1]}"
    data = {"device": "cuda", "name": name, "compute_capability": cc, "total_bytes": total, "count": count}
    return Check("gpu", OK, f"{name}, compute capability {cc}, {_gib(total)}{more}", data=data)


def check_driver(ctx: _Context) -> Check:
    if ctx.need("device", "the gpu check did not finish") != "cuda":
        smi = "nvidia-smi found" if ctx.nvidia_smi() is not None else "nvidia-smi not found"
        return Check("driver", SKIP, f"not used on the CPU ({smi})")
    built = ctx.facts.get("torch_cuda")
    driver, driver_cuda = _smi_versions(ctx.nvidia_smi())
    source = "nvidia-smi"
    if driver_cuda is None:
        api = ctx.probes.cuda_driver_api()
        driver_cuda = f"{api // 1000}.{api % 1000 // 10}" if api else None
        source = "libcuda"
    data = {"driver": driver, "driver_cuda": driver_cuda, "torch_cuda": built}
    supports = f"supports CUDA {driver_cuda}" if driver_cuda else "CUDA support unknown"
    name = f"driver {driver}" if driver else f"driver ({source})"
    finding = f"{name} {supports}; torch built with CUDA {built}"
    if driver_cuda and built and _version_tuple(driver_cuda)[:2] < _version_tuple(built)[:2]:
        return Check(
            "driver",
            WARN,
            f"{finding}: an older driver than torch's CUDA runs only through CUDA's minor-version compatibility",
            f"update the NVIDIA driver to one for CUDA {built} or newer (https://www.nvidia.com/drivers)",
            data,
        )
    return Check("driver", OK, finding, data=data)


def check_kernel(ctx: _Context) -> Check:
    version = ctx.need("bitsandbytes", "bitsandbytes does not import")
    device = ctx.need("device", "the gpu check did not finish")
    where = "the CPU" if device == "cpu" else f"the GPU ({ctx.facts.get('gpu_name')})"
    try:
        result = ctx.probes.kernel_check(device)
    except Exception as exc:
        return Check(
            "kernel",
            FAIL,
            f"bitsandbytes {version}'s 4-bit kernels do not run on {where} ({_first_line(exc)})",
            f"install a bitsandbytes build with kernels for this device: {BNB_REINSTALL}; `python -m bitsandbytes` shows what it found",
        )
    data = {**asdict(result), "tolerance": KERNEL_TOLERANCE, "round_trip_limit": ROUND_TRIP_LIMIT}
    measured = (
        f"relative error {result.forward_error:.1e} forward, {result.backward_error:.1e} backward "
        f"(tolerance {KERNEL_TOLERANCE:.0e}), NF4 round trip {result.round_trip_error:.3f} (limit {ROUND_TRIP_LIMIT})"
    )
    if result.cpu_dequant_error is not None:
        measured += f", dequantized vs the CPU's {result.cpu_dequant_error:.1e}"
    # `not x <= limit` so that a NaN fails too
    bad = [
        what
        for what, err, limit in (
            ("forward", result.forward_error, KERNEL_TOLERANCE),
            ("backward", result.backward_error, KERNEL_TOLERANCE),
            ("round trip", result.round_trip_error, ROUND_TRIP_LIMIT),
            ("dequantize", result.cpu_dequant_error, KERNEL_TOLERANCE),
        )
        if err is not None and not err <= limit
    ]
    if bad:
        return Check(
            "kernel",
            FAIL,
            f"nf4 matmul on {where} is wrong ({', '.join(bad)}): {measured}",
            f"bitsandbytes {version} computes wrong 4-bit results here: {BNB_REINSTALL}; `python -m bitsandbytes` "
            "shows which library it loaded; if that does not help, report it to bitsandbytes with that output",
            data,
        )
    return Check(
        "kernel",
        OK,
        f"nf4 matmul on {where} vs an fp32 dequantize-then-matmul reference: {measured}; {result.seconds:.2f} s",
        data=data,
    )


def check_bf16(ctx: _Context) -> Check:
    device = ctx.need("device", "the gpu check did not finish")
    if device == "cpu":
        native = None
        with contextlib.suppress(Exception):
            import torch

            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        how = {
            True: "native bf16 instructions",
            False: "no native bf16 instructions: slower",
            None: "native support unknown",
        }
        return Check("bf16", OK, f"bf16 autocast on the CPU ({how[native]})", data={"native": native})
    cuda = ctx.probes.cuda()
    major, minor = ctx.facts["capability"]
    if major >= 8:
        return Check("bf16", OK, f"native bf16 (compute capability {major}.{minor})", data={"native": True})
    try:
        emulated = bool(cuda.is_bf16_supported(including_emulation=True))
    except TypeError:  # torch before including_emulation
        emulated = bool(cuda.is_bf16_supported())
    if emulated:
        return Check(
            "bf16",
            WARN,
            f"bf16 unsupported natively (pre-Ampere GPU, compute capability {major}.{minor}): qlora-lite computes in bf16, which this GPU emulates, slowly",
            "training works but runs slower; an Ampere or newer GPU (compute capability 8.0+: RTX 30xx/40xx, A10, A100, L4, H100) runs it natively",
            {"native": False, "emulated": True},
        )
    return Check(
        "bf16",
        FAIL,
        f"bf16 unsupported (compute capability {major}.{minor}): qlora-lite computes in bf16",
        "use a GPU with compute capability 8.0 or newer (RTX 30xx/40xx, A10, A100, L4, H100)",
        {"native": False, "emulated": False},
    )


def check_attention(ctx: _Context) -> Check:
    torch_version = ctx.need("torch", "torch does not import")
    import torch.nn.functional as F

    sdpa = _version_tuple(torch_version) >= (2,) and hasattr(F, "scaled_dot_product_attention")
    status, fix = OK, ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flash_module = ctx.probes.import_module("flash_attn")
        flash = f"available (flash_attn {getattr(flash_module, '__version__', '?')})"
        if ctx.facts.get("device") != "cuda":
            flash += ", needs a CUDA GPU"
        elif ctx.facts.get("capability", (0, 0))[0] < 8:
            flash += ", needs compute capability 8.0+"
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "flash_attn"):
            flash = f"flash_attn installed but does not import ({_first_line(exc)})"
            status, fix = (
                WARN,
                "reinstall it for this torch: pip install flash-attn --no-build-isolation (or uninstall it)",
            )
        else:
            flash = "flash_attn not installed"
    except Exception as exc:  # built for another torch or CUDA: undefined symbols
        flash = f"flash_attn installed but does not import ({_first_line(exc)})"
        status, fix = WARN, "reinstall it for this torch: pip install flash-attn --no-build-isolation (or uninstall it)"
    used = ctx.probes.default_attention() if "transformers" in ctx.facts else "unknown (transformers does not import)"
    if not sdpa:
        status, fix = WARN, "upgrade torch (pip install -U 'torch>=2.4') for sdpa's fused attention"
    finding = f"sdpa {'available' if sdpa else 'unavailable'}; flash_attention_2: {flash}; transformers uses {used}"
    return Check(
        "attention", status, finding, fix, {"sdpa": sdpa, "flash_attention_2": flash, "transformers_uses": used}
    )


def check_memory(ctx: _Context) -> Check:
    device = ctx.need("device", "the gpu check did not finish")
    if device == "cuda":
        free, total = ctx.facts["gpu_free"], ctx.facts["gpu_total"]
        data = {"free_bytes": free, "total_bytes": total}
        finding = f"GPU: {_gib(free)} free of {_gib(total)}"
        if free < 0.75 * total:
            return Check(
                "memory",
                WARN,
                f"{finding}: other processes hold {_gib(total - free)}",
                "stop them to fit larger models (nvidia-smi lists them)",
                data,
            )
        return Check("memory", OK, finding, data=data)
    host = ctx.probes.host_memory()
    if host is None:
        return Check("memory", OK, "host RAM unknown (no /proc/meminfo or sysconf)")
    available, total = host
    return Check(
        "memory",
        OK,
        f"host RAM: {_gib(available)} available of {_gib(total)} (no GPU)",
        data={"free_bytes": available, "total_bytes": total},
    )


def check_presets(ctx: _Context) -> Check:
    device = ctx.need("device", "the gpu check did not finish")
    if device != "cuda":
        return Check(
            "presets",
            SKIP,
            "no GPU: the presets are sized for GPU memory; on the CPU try `qlora-lite demo` (a tiny model, seconds)",
        )
    ctx.need("transformers", "transformers does not import")
    free = ctx.facts["gpu_free"]
    needs, failed = {}, []
    for name in ctx.probes.preset_names():
        try:
            needs[name] = ctx.probes.preset_memory(name)
        except Exception as exc:  # one preset the installed transformers cannot build does not hide the others
            failed.append(f"{name} ({_first_line(exc, 80)})")
    fitting = sorted((n for n, (total, _) in needs.items() if total <= free), key=lambda n: needs[n][1])
    too_big = sorted((n for n in needs if n not in fitting), key=lambda n: needs[n][1])
    settings = ctx.probes.default_settings()
    data = {
        "free_bytes": free,
        "needs_bytes": {n: needs[n][0] for n in needs},
        "fitting": fitting,
        "largest": fitting[-1] if fitting else None,
        "settings": settings,
    }
    ctx.facts["presets_fitting"] = fitting
    unknown = f"; could not estimate: {', '.join(failed)}" if failed else ""
    if not fitting:
        smallest = too_big[0] if too_big else None
        need = f" (the smallest, {smallest}, needs {_gib(needs[smallest][0])})" if smallest else ""
        return Check(
            "presets",
            WARN,
            f"none fits in {_gib(free)} free at default settings ({settings}){need}{unknown}",
            f"free GPU memory, or shrink the run: `qlora-lite memory {smallest or 'qwen2.5-0.5b'} --gpu-memory {free / GiB:.1f}GiB` "
            "shows the micro-batch and sequence length that fit",
            data,
        )
    listed = ", ".join(f"{n} ({_gib(needs[n][0])})" for n in fitting)
    rest = f"; too big: {', '.join(f'{n} ({_gib(needs[n][0])})' for n in too_big)}" if too_big else ""
    finding = (
        f"fit in {_gib(free)} free at default settings ({settings}): {listed}; largest: {fitting[-1]}{rest}{unknown}"
    )
    return Check(
        "presets",
        WARN if failed else OK,
        finding,
        "upgrade transformers: pip install -U transformers" if failed else "",
        data,
    )


CHECKS: list[tuple[str, Callable[[_Context], Check]]] = [
    ("torch", check_torch),
    ("transformers", check_transformers),
    ("bitsandbytes", check_bitsandbytes),
    ("peft", check_peft),
    ("gpu", check_gpu),
    ("driver", check_driver),
    ("kernel", check_kernel),
    ("bf16", check_bf16),
    ("attention", check_attention),
    ("memory", check_memory),
    ("presets", check_presets),
]

# ------------------------------------------------------------------------------------------ report


@dataclass
class DoctorReport:
    """The checks, the verdict and the exit code (0: ready, GPU or CPU-only; 1: a check failed)."""

    checks: list[Check]
    verdict: str
    ready: bool
    device: str | None
    largest_preset: str | None
    fitting_presets: list[str]
    seconds: float

    @property
    def exit_code(self) -> int:
        return 0 if self.ready else 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: checks (name, status, finding, fix, data, seconds), verdict, ready, exit_code, ..."""
        return {
            "checks": [asdict(c) for c in self.checks],
            "verdict": self.verdict,
            "ready": self.ready,
            "exit_code": self.exit_code,
            "device": self.device,
            "fitting_presets": self.fitting_presets,
            "largest_preset": self.largest_preset,
            "seconds": round(self.seconds, 3),
        }


def _run_one(ctx: _Context, name: str, check: Callable[[_Context], Check]) -> Check:
    start = time.perf_counter()
    try:
        # a library printing at import must not break --json's one object (C-level output is not caught)
        with contextlib.redirect_stdout(io.StringIO()):
            result = check(ctx)
    except _Skip as skip:
        result = Check(name, SKIP, str(skip))
    except Exception as exc:
        result = Check(
            name,
            FAIL,
            f"the check itself failed: {_first_line(exc)}",
            "an unusual install or a bug in qlora-lite's doctor; please report this line",
        )
    result.seconds = time.perf_counter() - start
    return result


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def verdict_of(checks: list[Check], facts: dict[str, Any]) -> tuple[str, bool]:
    """(the verdict line, whether the machine is ready to train)."""
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        return f"not ready: {_plural(len(failed), 'problem')} ({', '.join(failed)})", False
    device = facts.get("device")
    warned = [c for c in checks if c.status == WARN and not (device == "cpu" and c.name == "gpu")]
    more = f" ({_plural(len(warned), 'warning')} above)" if warned else ""
    if device != "cuda":
        return f"can train on the CPU only (slow){more}", True
    where = f"ready to train on {facts['gpu_name']} ({facts['gpu_total'] / GiB:.0f} GiB)"
    fitting = facts.get("presets_fitting")
    if fitting:
        return f"{where}: fits up to {fitting[-1]} at default settings{more}", True
    if fitting is not None:
        return f"{where}, but no preset fits in its free memory at default settings{more}", True
    return f"{where}{more}", True


def run_doctor(probes: Probes | None = None) -> DoctorReport:
    """Run every check in order (each isolated) and decide the verdict."""
    start = time.perf_counter()
    ctx = _Context(probes or Probes())
    checks = [_run_one(ctx, name, check) for name, check in CHECKS]
    verdict, ready = verdict_of(checks, ctx.facts)
    fitting = ctx.facts.get("presets_fitting") or []
    return DoctorReport(
        checks=checks,
        verdict=verdict,
        ready=ready,
        device=ctx.facts.get("device"),
        largest_preset=fitting[-1] if fitting else None,
        fitting_presets=list(fitting),
        seconds=time.perf_counter() - start,
    )
