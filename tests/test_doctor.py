"""`qlora-lite doctor`: the checks, their lines, the verdict and the exit code.

The GPU path is tested on the CPU through `Probes`: a fake torch.cuda (name, compute capability, memory, bf16),
a canned nvidia-smi header, fake imports; the memory model's presets are real. The kernel check is real: the
NF4 matmul runs through bitsandbytes on the CPU (faked GPUs get the CPU's measurement, or a deliberately wrong
matmul). One test runs the whole command on this machine's CPU, unfaked.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from qlora_lite.cli import doctor as doctor_cli
from qlora_lite.doctor.checks import MINIMUM_VERSIONS
from qlora_lite.doctor.probes import KERNEL_TOLERANCE, Probes, nf4_kernel_check
from qlora_lite.doctor.report import CHECKS, run_doctor

GiB = 1 << 30
SMI = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.14              Driver Version: 550.54.14      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
"""
LINE = re.compile(r"^(ok|warn|fail|skip)\s+(\S+)\s+(.*)$")


class FakeCuda:
    """The torch.cuda functions the doctor calls, for one GPU."""

    def __init__(self, name: str, capability: tuple[int, int], free: float, total: float, emulated_bf16: bool = True):
        self.name, self.capability = name, capability
        self.free, self.total = int(free * GiB), int(total * GiB)
        self.emulated_bf16 = emulated_bf16

    def is_available(self):
        return True

    def device_count(self):
        return 1

    def current_device(self):
        return 0

    def get_device_name(self, index):
        return self.name

    def get_device_capability(self, index):
        return self.capability

    def mem_get_info(self, index):
        return self.free, self.total

    def is_bf16_supported(self, including_emulation=True):
        return self.capability >= (8, 0) or (including_emulation and self.emulated_bf16)


class NoCuda:
    def is_available(self):
        return False


def importer(missing=(), fake=None):
    """importlib.import_module with some packages missing and some faked."""
    fake = fake or {}

    def import_module(name):
        if name in missing:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        if name in fake:
            return fake[name]
        return importlib.import_module(name)

    return import_module


def cpu_kernel(device):
    """The real kernel check, run on the CPU whatever device the fake says."""
    return nf4_kernel_check("cpu")


RTX_4090 = dict(name="NVIDIA GeForce RTX 4090", capability=(8, 9), free=24, total=24)


def gpu_probes(gpu=None, driver_cuda="12.4", torch_cuda="12.4", **overrides):
    values = dict(
        cuda=lambda: FakeCuda(**(gpu or RTX_4090)),
        torch_cuda_version=lambda: torch_cuda,
        nvidia_smi=lambda: SMI.format(cuda=driver_cuda),
        import_module=importer(missing=("flash_attn",)),
        kernel_check=cpu_kernel,
        default_attention=lambda: "sdpa",
    )
    values.update(overrides)
    return Probes(**values)


def run_cli(capsys, probes, as_json=False):
    """(exit code, {check: (mark, text)}, verdict) from the command's printed output."""
    code = doctor_cli.run(argparse.Namespace(json=as_json), {}, probes=probes)
    out = capsys.readouterr().out
    if as_json:
        return code, json.loads(out), None
    lines = out.strip().splitlines()
    checks = {}
    for line in lines[:-2]:
        match = LINE.match(line)
        assert match, f"not a check line: {line!r}"
        checks[match.group(2)] = (match.group(1), match.group(3))
    assert re.fullmatch(r"checked in \d+\.\d s", lines[-2])
    assert lines[-1].startswith("verdict: ")
    return code, checks, lines[-1].removeprefix("verdict: ")


def test_fake_rtx_4090_is_ready_and_lists_the_presets_that_fit(capsys):
    from qlora_lite.memory.inventory import preset_names
    from qlora_lite.memory.report import estimate_memory

    code, checks, verdict = run_cli(capsys, gpu_probes())
    assert code == 0
    assert verdict == "ready to train on NVIDIA GeForce RTX 4090 (24 GiB): fits up to qwen2.5-14b at default settings"
    assert [name for name, _ in CHECKS] == list(checks)
    assert checks["gpu"] == ("ok", "NVIDIA GeForce RTX 4090, compute capability 8.9, 24.0 GiB")
    assert checks["driver"] == ("ok", "driver 550.54.14 supports CUDA 12.4; torch built with CUDA 12.4")
    assert checks["bf16"] == ("ok", "native bf16 (compute capability 8.9)")
    assert checks["memory"] == ("ok", "GPU: 24.0 GiB free of 24.0 GiB")
    assert checks["attention"] == (
        "ok",
        "sdpa available; flash_attention_2: flash_attn not installed; transformers uses sdpa",
    )
    mark, kernel = checks["kernel"]
    assert mark == "ok" and kernel.startswith("nf4 matmul on the GPU (NVIDIA GeForce RTX 4090) vs an fp32")
    # the presets line: every shipped preset estimated by the memory report, fitting ones by size, the 70B too big
    mark, presets = checks["presets"]
    assert mark == "ok"
    assert presets.startswith("fit in 24.0 GiB free at default settings (4-bit nf4, r=16, seq 1024 x micro-batch 4): ")
    assert "largest: qwen2.5-14b" in presets
    report = run_doctor(gpu_probes())
    needs = {name: estimate_memory(name).total for name in preset_names()}
    assert report.checks[-1].data["needs_bytes"] == needs
    fitting = report.fitting_presets
    assert set(fitting) == {name for name, total in needs.items() if total <= 24 * GiB}
    assert {"qwen2.5-0.5b", "llama-3.1-8b", "qwen2.5-14b"} <= set(fitting)
    assert fitting[:2] == ["qwen2.5-0.5b", "llama-3.2-1b"] and fitting[-1] == report.largest_preset == "qwen2.5-14b"
    if "llama-3.1-70b" in needs:
        assert "llama-3.1-70b" not in fitting and "; too big: llama-3.1-70b (" in presets


def test_fake_12_gib_gpu_fits_a_smaller_largest_preset(capsys):
    gpu = dict(name="NVIDIA GeForce RTX 4070 Ti", capability=(8, 9), free=11.5, total=12)
    code, checks, verdict = run_cli(capsys, gpu_probes(gpu))
    assert code == 0
    assert verdict == "ready to train on NVIDIA GeForce RTX 4070 Ti (12 GiB): fits up to gemma-2-9b at default settings"
    assert "qwen2.5-14b (" in checks["presets"][1].split("; too big: ")[1]


def test_json_for_scripts(capsys):
    code, data, _ = run_cli(capsys, gpu_probes(), as_json=True)
    assert code == data["exit_code"] == 0 and data["ready"] is True and data["device"] == "cuda"
    assert data["verdict"].startswith("ready to train on NVIDIA GeForce RTX 4090 (24 GiB): fits up to qwen2.5-14b")
    assert data["largest_preset"] == "qwen2.5-14b" == data["fitting_presets"][-1]
    assert [c["name"] for c in data["checks"]] == [name for name, _ in CHECKS]
    for check in data["checks"]:
        assert set(check) == {"name", "status", "finding", "fix", "data", "seconds"}
    kernel = next(c for c in data["checks"] if c["name"] == "kernel")
    assert 0 < kernel["data"]["forward_error"] < KERNEL_TOLERANCE == kernel["data"]["tolerance"]


def test_missing_bitsandbytes_is_one_problem_with_the_pip_line(capsys):
    code, checks, verdict = run_cli(capsys, gpu_probes(import_module=importer(missing=("bitsandbytes", "flash_attn"))))
    assert code == 1
    assert checks["bitsandbytes"] == (
        "fail",
        "bitsandbytes is not installed; fix: pip install 'bitsandbytes>=0.45'",
    )
    assert checks["kernel"] == ("skip", "not run: bitsandbytes does not import")
    assert verdict == "not ready: 1 problem (bitsandbytes)"


def test_broken_bitsandbytes_install_says_reinstall(capsys):
    def import_module(name):
        if name == "bitsandbytes":
            raise RuntimeError("CUDA Setup failed despite GPU being available.\nmore text")
        return importer(missing=("flash_attn",))(name)

    code, checks, verdict = run_cli(capsys, gpu_probes(import_module=import_module))
    assert code == 1
    mark, text = checks["bitsandbytes"]
    assert mark == "fail"
    assert text.endswith(
        "but does not import (RuntimeError: CUDA Setup failed despite GPU being available.); "
        "fix: pip install --force-reinstall 'bitsandbytes>=0.45'"
    )


def test_old_transformers_fails_with_the_upgrade_line(capsys):
    real = importlib.import_module("transformers")
    old = SimpleNamespace(__version__="4.40.2")
    code, checks, verdict = run_cli(
        capsys, gpu_probes(import_module=importer(missing=("flash_attn",), fake={"transformers": old}))
    )
    assert real is not old and code == 1
    assert checks["transformers"] == (
        "fail",
        "4.40.2 is older than qlora-lite needs (4.45); fix: pip install -U 'transformers>=4.45'",
    )
    assert checks["presets"] == ("skip", "not run: transformers does not import")
    assert verdict == "not ready: 1 problem (transformers)"


def test_wrong_kernel_result_fails_with_a_fix(capsys):
    import bitsandbytes as bnb

    def off_by_five_percent(x, w, quant_state):
        return bnb.matmul_4bit(x, w, quant_state=quant_state) * 1.05

    probes = gpu_probes(kernel_check=lambda device: nf4_kernel_check("cpu", matmul=off_by_five_percent))
    code, checks, verdict = run_cli(capsys, probes)
    assert code == 1
    mark, text = checks["kernel"]
    assert mark == "fail"
    assert text.startswith(
        "nf4 matmul on the GPU (NVIDIA GeForce RTX 4090) is wrong (forward, backward): relative error 5.0e-02 forward"
    )
    assert "; fix: bitsandbytes " in text and "pip install --force-reinstall 'bitsandbytes>=0.45'" in text
    assert "python -m bitsandbytes" in text
    assert verdict == "not ready: 1 problem (kernel)"


def test_nan_kernel_result_fails():
    import bitsandbytes as bnb

    def nan(x, w, quant_state):
        return bnb.matmul_4bit(x, w, quant_state=quant_state) * float("nan")

    report = run_doctor(gpu_probes(kernel_check=lambda device: nf4_kernel_check("cpu", matmul=nan)))
    kernel = next(c for c in report.checks if c.name == "kernel")
    assert kernel.status == "fail" and "is wrong (forward, backward)" in kernel.finding
    assert report.exit_code == 1


def test_kernel_that_does_not_run_fails_with_a_fix(capsys):
    def no_kernel(device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    code, checks, verdict = run_cli(capsys, gpu_probes(kernel_check=no_kernel))
    assert code == 1
    mark, text = checks["kernel"]
    assert mark == "fail"
    assert (
        "4-bit kernels do not run on the GPU (NVIDIA GeForce RTX 4090) (RuntimeError: CUDA error: no kernel image"
        in text
    )
    assert "; fix: install a bitsandbytes build with kernels for this device: pip install --force-reinstall" in text


def test_pre_ampere_gpu_warns_about_bf16(capsys):
    t4 = dict(name="Tesla T4", capability=(7, 5), free=14.5, total=15)
    flash = SimpleNamespace(__version__="2.7.4")
    code, checks, verdict = run_cli(capsys, gpu_probes(t4, import_module=importer(fake={"flash_attn": flash})))
    assert code == 0
    assert checks["bf16"] == (
        "warn",
        "bf16 unsupported natively (pre-Ampere GPU, compute capability 7.5): qlora-lite computes in bf16, which this "
        "GPU emulates, slowly; fix: training works but runs slower; an Ampere or newer GPU (compute capability 8.0+: "
        "RTX 30xx/40xx, A10, A100, L4, H100) runs it natively",
    )
    assert checks["attention"][1] == (
        "sdpa available; flash_attention_2: available (flash_attn 2.7.4), needs compute capability 8.0+; "
        "transformers uses sdpa"
    )
    assert verdict.startswith("ready to train on Tesla T4 (15 GiB): fits up to ")
    assert verdict.endswith(" at default settings (1 warning above)")


def test_gpu_without_any_bf16_fails():
    old = dict(name="Tesla P100", capability=(6, 0), free=15, total=16, emulated_bf16=False)
    report = run_doctor(gpu_probes(old))
    bf16 = next(c for c in report.checks if c.name == "bf16")
    assert (bf16.status, bf16.finding) == (
        "fail",
        "bf16 unsupported (compute capability 6.0): qlora-lite computes in bf16",
    )
    assert report.verdict == "not ready: 1 problem (bf16)" and report.exit_code == 1


def test_busy_small_gpu_warns_and_no_preset_fits(capsys):
    gpu = dict(name="NVIDIA GeForce GTX 1650", capability=(8, 6), free=1.0, total=4)
    code, checks, verdict = run_cli(capsys, gpu_probes(gpu))
    assert code == 0
    assert checks["memory"] == (
        "warn",
        "GPU: 1.0 GiB free of 4.0 GiB: other processes hold 3.0 GiB; fix: stop them to fit larger models "
        "(nvidia-smi lists them)",
    )
    mark, text = checks["presets"]
    assert mark == "warn"
    assert text.startswith(
        "none fits in 1.0 GiB free at default settings (4-bit nf4, r=16, seq 1024 x micro-batch 4) (the smallest, qwen2.5-0.5b, needs "
    )
    assert "; fix: free GPU memory, or shrink the run: `qlora-lite memory qwen2.5-0.5b --gpu-memory 1.0GiB`" in text
    assert verdict == (
        "ready to train on NVIDIA GeForce GTX 1650 (4 GiB), but no preset fits in its free memory at default "
        "settings (2 warnings above)"
    )


def test_old_driver_warns(capsys):
    code, checks, _ = run_cli(capsys, gpu_probes(driver_cuda="12.2"))
    assert code == 0
    assert checks["driver"] == (
        "warn",
        "driver 550.54.14 supports CUDA 12.2; torch built with CUDA 12.4: an older driver than torch's CUDA runs "
        "only through CUDA's minor-version compatibility; fix: update the NVIDIA driver to one for CUDA 12.4 or "
        "newer (https://www.nvidia.com/drivers)",
    )


def test_cuda_build_that_cannot_see_the_gpu_says_why(capsys):
    probes = gpu_probes(cuda=lambda: NoCuda(), driver_cuda="11.4")
    code, checks, verdict = run_cli(capsys, probes)
    assert code == 0
    mark, text = checks["gpu"]
    assert mark == "warn"
    assert (
        "(CUDA 12.4; nvidia-smi reports driver 550.54.14 for CUDA 11.4): training runs on the CPU, very slowly" in text
    )
    assert text.endswith(
        "; fix: update the NVIDIA driver to one for CUDA 12.4 or newer, or install a torch build for CUDA 11.4"
    )
    assert verdict == "can train on the CPU only (slow)"

    code, checks, verdict = run_cli(capsys, gpu_probes(cuda=lambda: NoCuda(), torch_cuda=None))
    assert checks["gpu"] == (
        "warn",
        f"torch {importlib.import_module('torch').__version__} is a CPU-only build, so the GPU goes unused "
        "(nvidia-smi reports driver 550.54.14 for CUDA 12.4): training runs on the CPU, very slowly; fix: install a "
        "CUDA build of torch: "
        "pip install torch --index-url https://download.pytorch.org/whl/cu124",
    )
    assert (code, verdict) == (0, "can train on the CPU only (slow)")


def test_each_check_is_isolated(capsys):
    def boom():
        raise RuntimeError("boom")

    class BrokenCuda(FakeCuda):
        def mem_get_info(self, index):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    code, checks, verdict = run_cli(capsys, gpu_probes(cuda=lambda: NoCuda(), host_memory=boom))
    assert code == 1
    assert checks["memory"][0] == "fail"
    assert checks["memory"][1].startswith("the check itself failed: RuntimeError: boom; fix: ")
    assert checks["kernel"][0] == "ok" and verdict == "not ready: 1 problem (memory)"

    code, checks, verdict = run_cli(capsys, gpu_probes(cuda=lambda: BrokenCuda(**RTX_4090)))
    assert code == 1
    assert checks["gpu"][1].startswith("the check itself failed: RuntimeError: CUDA error: an illegal memory access")
    for name in ("driver", "kernel", "bf16", "memory", "presets"):
        assert checks[name] == ("skip", "not run: the gpu check did not finish"), name
    assert verdict == "not ready: 1 problem (gpu)"


def test_minimum_versions_are_pyprojects():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    declared = dict(re.findall(r'^\s*"([\w-]+)>=([\d.]+)",$', pyproject.split("[project.optional", 1)[0], re.M))
    assert {name: declared[name] for name in MINIMUM_VERSIONS} == MINIMUM_VERSIONS


def test_help_lists_doctor():
    from qlora_lite.cli import build_parser

    assert "doctor" in build_parser().format_help()


@pytest.mark.skipif(
    importlib.import_module("torch").cuda.is_available(), reason="the unfaked run is the CPU path on a CPU machine"
)
def test_real_cpu_run(capsys):
    from qlora_lite.cli import main

    code = main(["doctor"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert lines[-1] == "verdict: can train on the CPU only (slow)"
    checks = {m.group(2): (m.group(1), m.group(3)) for m in map(LINE.match, lines[:-2])}
    assert list(checks) == [name for name, _ in CHECKS]
    mark, kernel = checks["kernel"]
    assert mark == "ok" and kernel.startswith("nf4 matmul on the CPU vs an fp32 dequantize-then-matmul reference: ")
    forward, backward = (float(x) for x in re.search(r"relative error (\S+) forward, (\S+) backward", kernel).groups())
    assert 0 < forward < KERNEL_TOLERANCE and 0 < backward < KERNEL_TOLERANCE
    assert checks["gpu"][0] == "warn" and checks["gpu"][1].endswith(
        "training runs on the CPU, very slowly; fix: install a CUDA build of torch: "
        "pip install torch --index-url https://download.pytorch.org/whl/cu124"
    )
    assert checks["presets"][0] == checks["driver"][0] == "skip"

    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "can train on the CPU only (slow)" and data["device"] == "cpu"
    kernel = next(c for c in data["checks"] if c["name"] == "kernel")
    assert kernel["status"] == "ok" and kernel["data"]["device"] == "cpu"
    assert 0.05 < kernel["data"]["round_trip_error"] < 0.15  # NF4's own rounding, measured
