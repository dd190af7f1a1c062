"""`qlora-lite doctor`'s checks: is this machine ready to train, and what fits on it?

Each check is a function of a `_Context` that returns one `Check` (name, status ok / warn / fail / skip, finding,
fix). The checks run in order (`report.CHECKS`) and share what they found (`_Context.facts`); a check that needs
what an earlier one could not find is skipped (status skip, not counted as a problem). Every look at the machine
goes through `probes.Probes`, so tests fake a GPU on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from .probes import KERNEL_TOLERANCE, ROUND_TRIP_LIMIT, Probes

GiB = 1 << 30
OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

# pyproject.toml's dependencies (tests/test_doctor.py checks they agree)
MINIMUM_VERSIONS = {"torch": "2.4", "transformers": "4.45", "bitsandbytes": "0.45"}
CUDA_TORCH_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cu124"
BNB_REINSTALL = "pip install --force-reinstall 'bitsandbytes>=0.45'"

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
