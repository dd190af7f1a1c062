#!/usr/bin/env python
"""One command that proves qlora-lite on one CUDA GPU, section by section, into gpu-report.json / gpu-report.md.

    PYTHONUNBUFFERED=1 python tools/gpu_suite.py --device cuda --out $OUT/gpu     # under 8 minutes on an H100/H200
    python tools/gpu_suite.py --device cuda --smoke --out /tmp/gpu-smoke           # the same plumbing, tiny shapes
    python tools/gpu_suite.py --device cpu --smoke --out /tmp/gpu-smoke            # on the CPU (tests/test_gpu_suite.py)

Sections, in this order (`--sections a,b` runs a subset):

  environment      torch, CUDA, bitsandbytes, transformers, peft versions; the GPU, its memory, a bf16 matmul's TFLOP/s
  correctness      4-bit (nf4, double quant) and 8-bit bytes quantized on the GPU vs on the CPU; logits of
                   `load_quantized` vs transformers' `BitsAndBytesConfig` load; the LoRA layer vs an fp64 reference
  training         `qlora_lite.train` with paged_adamw_8bit (the loss falls); a run SIGKILLed after a checkpoint
                   (QLORA_LITE_TEST_KILL) and resumed with --resume ends with the uninterrupted run's adapter
  speed            tools/bench.py's own child, both sides (qlora-lite, transformers + peft + bitsandbytes), on the
                   1B shape at 2048 tokens: tokens/s ratio, peak reserved ratio, MFU against 6 * N * tokens/s
  memory_report    tools/measure_memory.py at 8-16 grid points (bits 4/8, seq 512/2048, micro-batch 1/4,
                   checkpointing on/off): predicted vs torch.cuda.max_memory_reserved, each point's error
  oom              a run squeezed under a 12 GiB cap exits 3 with advice; the advised setting trains under that cap
  longest_context  the longest sequence that trains the 1B shape under a 24 GiB cap (a search within the time box)
                   against the memory model's longest sequence

Every section runs in a fresh subprocess with its own time box (and the whole within --budget-s), so an exception,
a CUDA crash or a hang in one is recorded as that section's failure and the next one runs. Both reports are
rewritten when a section starts, while it runs (its partial figures) and when it ends, so a kill loses nothing
already measured. Each section has a status: ok, skipped (with the reason) or failed (with the error); figures
that miss a target are listed as missed targets, which do not fail a section. Models with random weights and
all run directories go to --work (a temporary directory by default); only the reports and gpu-suite.log go to --out.

On the CPU (`--device cpu`, always with tiny shapes) what needs CUDA is recorded as skipped; training, resume,
the memory report's points, the out-of-memory advice (through the QLORA_LITE_TEST_OOM hook) and the
longest-context search (live tensor bytes against a pretend cap) run for real. Exit code: 0 when no section
failed, 1 otherwise. docs/gpu.md says how to run it on a GPU machine (bitsandbytes from a carried wheel).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
THIS = Path(__file__).resolve()
GiB = 2**30

# (name, title, time box in seconds on a GPU at full shapes, time box for --smoke)
SECTIONS = [
    ("environment", "Environment", 60, 90),
    ("correctness", "Correctness on CUDA", 100, 90),
    ("training", "Training, kill and resume", 110, 120),
    ("speed", "Speed and memory against transformers + peft + bitsandbytes", 160, 90),
    ("memory_report", "The memory report's accuracy", 130, 90),
    ("oom", "Out of memory: exit 3, advice, the advised setting", 100, 90),
    ("longest_context", "Longest context under a 24 GiB cap", 120, 90),
]
SECTION_NAMES = [name for name, *_ in SECTIONS]
DEFAULT_BUDGET_S = {False: 470, True: 400}  # keyed by --smoke
MIN_SECTION_S = 15  # a section is not started with less than this left
FLOOR_S = 30  # what each later section is kept at least, when an earlier one's time box is cut to the budget

# Fault points and budgets of qlora_lite (io/faults.py, memory/oom.py); the suite sets them only where it means to.
KILL_ENV = "QLORA_LITE_TEST_KILL"
KILL_RANK_ENV = "QLORA_LITE_TEST_KILL_RANK"
ENOSPC_ENV = "QLORA_LITE_TEST_ENOSPC"
OOM_ENV = "QLORA_LITE_TEST_OOM"
GPU_MEMORY_ENV = "QLORA_LITE_GPU_MEMORY"
FAIL_ENV = "GPU_SUITE_FAIL_SECTION"  # same as --fail-section, for tests

WHEEL = "bitsandbytes==0.50.2"
INSTALL_HINT = (
    "carry it as a wheel (docs/gpu.md): on a machine with pip, in the repo root, `echo /.whl/ >> .git/info/exclude` "
    "and `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
    "--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 "
    f"--platform manylinux2014_x86_64 -d .whl {WHEEL}`; on the GPU machine `python3 -m pip install -q --no-index "
    "--no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD`"
)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name() in this order (the more specific names first). --peak-tflops overrides.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0, "H100 PCIe (datasheet: 756 TFLOP/s bf16 dense)"),
    ("H100 NVL", 835.0, "H100 NVL (datasheet: 835 TFLOP/s bf16 dense per GPU)"),
    ("GH200", 989.0, "GH200 (datasheet: 989 TFLOP/s bf16 dense)"),
    ("H200", 989.0, "H200 (datasheet: 989 TFLOP/s bf16 dense, as the H100 SXM)"),
    ("H100", 989.0, "H100 SXM (datasheet: 989 TFLOP/s bf16 dense)"),
    ("H800", 989.0, "H800 SXM (datasheet: 989 TFLOP/s bf16 dense)"),
    ("A100", 312.0, "A100 (datasheet: 312 TFLOP/s bf16 dense)"),
    ("A800", 312.0, "A800 (datasheet: 312 TFLOP/s bf16 dense)"),
    ("L40S", 362.0, "L40S (datasheet: 362 TFLOP/s bf16 dense)"),
    ("L40", 181.0, "L40 (datasheet: 181 TFLOP/s bf16 dense)"),
    ("L4", 121.0, "L4 (datasheet: 121 TFLOP/s bf16 dense)"),
    ("A10G", None, "A10G (no datasheet figure here: pass --peak-tflops)"),
    ("A10", 125.0, "A10 (datasheet: 125 TFLOP/s bf16 dense)"),
]


def _bench_shapes() -> dict:
    """tools/bench.py's model shapes (the suite measures the same models the bench does)."""
    spec = importlib.util.spec_from_file_location("gpu_suite_bench_shapes", TOOLS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODELS


# Model shapes (Llama, random bf16 weights, the byte tokenizer of qlora_lite.model.tiny), by (kind, smoke).
# "big" at full size is tools/bench.py's llama-1b-128k (Llama-3.2-1B's shape, untied lm_head), written once.
BENCH_SHAPES = _bench_shapes()
SMALL_SPEC, BIG_SPEC = BENCH_SHAPES["llama-small"], BENCH_SHAPES["llama-1b-128k"]
TINY_SPEC = dict(
    hidden_size=64, layers=2, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, vocab_size=320
)
TINY_BIG_SPEC = dict(
    hidden_size=256, layers=2, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024
)
MODELS = {
    ("small", False): ("llama-small", SMALL_SPEC, 4096),
    ("big", False): ("llama-1b-128k", BIG_SPEC, 131072),
    ("small", True): ("suite-tiny", TINY_SPEC, 256),
    ("big", True): ("suite-tiny-big", TINY_BIG_SPEC, 256),
}


# ============================================================================================ shared helpers


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tail(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every subprocess: the repo importable first, offline hub, no fault point left set."""
    env = dict(os.environ)
    paths = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in (KILL_ENV, KILL_RANK_ENV, ENOSPC_ENV, OOM_ENV, GPU_MEMORY_ENV, FAIL_ENV):
        env.pop(key, None)
    env.update(extra)
    return env


def import_tool(name: str):
    """`tools/<name>.py` as a module (tools/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"gpu_suite_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def peak_bf16_tflops(gpu_name: str | None) -> tuple[float | None, str | None]:
    """(dense bf16 peak TFLOP/s, which table row) for a GPU name, or (None, None) when it is not in the table."""
    if not gpu_name:
        return None, None
    for key, value, label in PEAK_BF16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return value, label
    return None, None


def fmt(value) -> str:
    """A figure for the Markdown report."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return (
            ", ".join(fmt(v) for v in value)
            if all(not isinstance(v, (dict, list)) for v in value)
            else json.dumps(value, default=str)
        )
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value)


# ============================================================================================ the child side


class Skip(Exception):
    """This check or section cannot run here (no CUDA, no bitsandbytes, no time left): recorded as skipped."""


class Check:
    """One measured comparison inside a section: figures, targets and a status."""

    def __init__(self, entry: dict, recorder: Recorder):
        self.entry, self.recorder = entry, recorder

    def fig(self, **figures) -> None:
        self.entry["figures"].update(figures)
        self.recorder.flush()

    def target(self, text: str, met: bool, value=None) -> None:
        """A figure against what it should be; a missed target is reported, it does not fail the check."""
        self.entry["targets"].append({"target": text, "met": bool(met), "value": value})
        self.recorder.flush()

    def note(self, text: str) -> None:
        self.entry.setdefault("notes", []).append(text)
        self.recorder.flush()

    def skip(self, reason: str):
        raise Skip(reason)


class Recorder:
    """A section's result file, rewritten atomically whenever a figure changes (the parent reads it as it goes)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"status": "running", "summary": "", "figures": {}, "checks": [], "notes": []}
        self.flush()

    def flush(self) -> None:
        write_json_atomic(self.path, self.data)

    def figure(self, **figures) -> None:
        self.data["figures"].update(figures)
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def summary(self, text: str) -> None:
        self.data["summary"] = text
        self.flush()

    @contextlib.contextmanager
    def check(self, name: str):
        entry = {"name": name, "status": "running", "figures": {}, "targets": []}
        self.data["checks"].append(entry)
        self.flush()
        started = time.perf_counter()
        try:
            yield Check(entry, self)
            entry["status"] = "ok"
        except Skip as exc:
            entry["status"], entry["reason"] = "skipped", str(exc)
        except Exception as exc:  # recorded; the section's next check still runs
            entry["status"], entry["error"] = "failed", one_line(exc)
            entry["traceback"] = tail(traceback.format_exc(), 2500)
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 2)
            self.flush()

    def finish(self, status: str | None = None, reason: str | None = None, error: str | None = None) -> None:
        checks = self.data["checks"]
        if status is None:
            failed = [c for c in checks if c["status"] == "failed"]
            skipped = [c for c in checks if c["status"] == "skipped"]
            if failed:
                status = "failed"
                error = (
                    f"{len(failed)} of {len(checks)} checks failed; first: {failed[0]['name']}: {failed[0]['error']}"
                )
            elif checks and len(skipped) == len(checks):
                status = "skipped"
                reason = "; ".join(dict.fromkeys(c["reason"] for c in skipped))
            else:
                status = "ok"
        self.data.update(status=status)
        if reason:
            self.data["reason"] = reason
        if error:
            self.data["error"] = error
        self.flush()


class Ctx:
    """What a section's code gets: device, shapes, the work dir, its soft deadline and the recorder."""

    def __init__(self, args, recorder: Recorder):
        self.device = args.device
        self.smoke = args.smoke
        self.work = Path(args.work)
        self.deadline = args.deadline
        self.rec = recorder
        self.peak_tflops = args.peak_tflops
        self.report = {}
        if args.report and Path(args.report).is_file():
            with contextlib.suppress(ValueError, OSError):
                self.report = json.loads(Path(args.report).read_text())
        self._cuda = None

    @property
    def cuda(self) -> bool:
        if self._cuda is None:
            import torch

            self._cuda = self.device == "cuda" and torch.cuda.is_available()
        return self._cuda

    def time_left(self) -> float:
        return self.deadline - time.time()

    def need(self, seconds: float, what: str) -> None:
        if self.time_left() < seconds:
            raise Skip(
                f"not enough of the section's time box left for {what} ({self.time_left():.0f} s left, ~{seconds:.0f} s needed)"
            )

    def earlier(self, section: str) -> dict:
        """The figures an earlier section recorded (from the report the parent keeps)."""
        for s in self.report.get("sections", []):
            if s.get("name") == section:
                return s
        return {}


def require_bnb() -> None:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
    except Exception as exc:
        raise Skip(f"bitsandbytes is not importable ({one_line(exc, 160)}); {INSTALL_HINT}") from None


def require_cuda_if_asked(ctx: Ctx) -> None:
    """A --device cuda run on a machine whose torch sees no GPU: nothing but the environment can say anything."""
    if ctx.device == "cuda" and not ctx.cuda:
        raise Skip(
            "no CUDA device visible (torch.cuda.is_available() is false); --device cpu --smoke runs the CPU plumbing"
        )


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def model_spec(kind: str, smoke: bool) -> tuple[str, dict, int]:
    return MODELS[(kind, smoke)]


def ensure_model(ctx: Ctx, kind: str) -> Path:
    """The `kind` model dir under work/models (random bf16 weights + the byte tokenizer), written once per suite run."""
    name, spec, max_positions = model_spec(kind, ctx.smoke)
    path = ctx.work / "models" / name
    if (path / ".complete").exists():
        return path
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_lite.model.tiny import make_tokenizer, tiny_config

    started = time.perf_counter()
    tmp = path.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    config = tiny_config("llama", max_position_embeddings=max_positions, tie_word_embeddings=False, **spec)
    torch.manual_seed(0)
    with torch.device("cuda" if ctx.cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    make_tokenizer().save_pretrained(tmp)
    del model
    if ctx.cuda:
        torch.cuda.empty_cache()
    (tmp / ".complete").write_text(now_iso())
    os.replace(tmp, path)
    print(f"wrote {name} ({spec}) to {path} in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def write_motif_records(path: Path, n: int, length: int, seed: int) -> Path:
    """Learnable text records: a random short word repeated to `length` characters (one byte token each)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with open(path, "w") as f:
        for _ in range(n):
            motif = "".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) + " "
            f.write(json.dumps({"text": (motif * (length // len(motif) + 1))[:length]}) + "\n")
    return path


def run_logged(cmd: list[str], timeout: float, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A subprocess with captured text output; its output is echoed into this section's log."""
    timeout = max(5.0, timeout)
    print(f"$ {shlex.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        for text in (out, err):
            if text.strip():
                print(tail(text.rstrip(), 4000), flush=True)
        raise RuntimeError(f"`{shlex.join(cmd[:4])} ...` did not finish within {timeout:.0f} s") from None
    for text in (proc.stdout, proc.stderr):
        if text.strip():
            print(tail(text.rstrip(), 6000), flush=True)
    print(f"({describe_exit(proc.returncode)})", flush=True)
    return proc


def describe_exit(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def rel_err(actual, expected) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


# -------------------------------------------------------------------------------------------- environment


def section_environment(ctx: Ctx) -> None:
    import platform

    rec = ctx.rec
    rec.figure(
        python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(), hostname=platform.node()
    )
    with rec.check("packages") as c:
        import torch

        c.fig(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        from importlib import metadata

        for name in ("transformers", "peft", "accelerate", "safetensors", "bitsandbytes"):
            # the installed version without importing (bitsandbytes' import is checked on its own below)
            if importlib.util.find_spec(name) is None:
                c.fig(**{name: None, f"{name}_error": "not installed"})
                continue
            try:
                c.fig(**{name: metadata.version(name)})
            except metadata.PackageNotFoundError:
                c.fig(**{name: getattr(importlib.import_module(name), "__version__", "?")})
        import qlora_lite

        location = Path(qlora_lite.__file__).resolve().parent
        c.fig(
            qlora_lite=qlora_lite.__version__,
            qlora_lite_path=str(location),
            qlora_lite_from_this_tree=location == REPO / "qlora_lite",
        )
    with rec.check("bitsandbytes") as c:
        try:
            require_bnb()
        except Skip as exc:
            raise RuntimeError(str(exc)) from None
        import bitsandbytes as bnb
        import torch

        c.fig(version=bnb.__version__, path=str(Path(bnb.__file__).parent))
        if ctx.cuda:  # the native CUDA library loads lazily: quantize and dequantize once to be sure it does
            import bitsandbytes.functional as F

            w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
            packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            back = F.dequantize_4bit(packed, state)
            c.fig(cuda_roundtrip_rel_err=rel_err(back.float(), w.float()))
            c.target("nf4 round trip on CUDA within 0.15 relative", rel_err(back.float(), w.float()) < 0.15)
    with rec.check("GPU") as c:
        import torch

        if not ctx.cuda:
            c.skip("no CUDA" if ctx.device == "cpu" else "no CUDA device visible (torch.cuda.is_available() is false)")
        props = torch.cuda.get_device_properties(0)
        peak, row = peak_bf16_tflops(props.name)
        c.fig(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / GiB, 2),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            device_count=torch.cuda.device_count(),
            peak_bf16_tflops=ctx.peak_tflops or peak,
            peak_source="--peak-tflops" if ctx.peak_tflops else row,
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            if smi.returncode == 0:
                c.fig(nvidia_smi=smi.stdout.strip())
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        c.fig(matmul_bf16_tflops=round(2 * n**3 * 10 / (time.perf_counter() - started) / 1e12, 1))
    figs = {k: v for c in rec.data["checks"] for k, v in c["figures"].items()}
    parts = [f"torch {figs.get('torch')} (CUDA {figs.get('torch_cuda')})", f"bitsandbytes {figs.get('bitsandbytes')}",
             f"transformers {figs.get('transformers')}", f"peft {figs.get('peft')}"]  # fmt: skip
    if figs.get("gpu"):
        parts.append(
            f"{figs['gpu']} {figs['gpu_memory_gib']} GiB, bf16 matmul {figs.get('matmul_bf16_tflops')} TFLOP/s"
        )
    rec.summary("; ".join(parts))


# -------------------------------------------------------------------------------------------- correctness


def stored_tensors(module) -> dict:
    """The tensors a quantized layer stores, by role: the packed weight / int8 codes and their statistics."""
    import bitsandbytes as bnb

    from qlora_lite.model.quant import row_scales_8bit

    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        out = {"weight": module.weight.data, "absmax": state.absmax}
        if state.nested:
            out.update(offset=state.offset, nested_absmax=state.state2.absmax)
        return out
    return {"weight": module.weight.data, "row_scales": row_scales_8bit(module)}


def byte_view(t):
    import torch

    t = t.detach().contiguous().cpu()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.reshape(-1).view(torch.uint8)


def compare_stored(a: dict, b: dict) -> dict:
    """{role: (bytes, differing bytes)} of two layers' stored tensors."""
    out = {}
    for role in a:
        x, y = byte_view(a[role]), byte_view(b[role])
        out[role] = (x.numel(), int((x != y).sum()) if x.shape == y.shape else x.numel())
    return out


def compare_packing(c: Check, ctx: Ctx, model_dir: Path, bits: int, gpu: str = "cuda") -> None:
    """The bytes of every quantized layer loaded on the CPU and on `gpu`, and of one weight quantized directly."""
    import torch

    from qlora_lite import load_quantized
    from qlora_lite.model import quant

    kw = dict(bits=bits, quant_type="nf4", double_quant=True, load_tokenizer=False)
    cpu, _ = load_quantized(model_dir, device="cpu", **kw)
    on_gpu, _ = load_quantized(model_dir, device=gpu, **kw)
    totals: dict[str, list[int]] = {}
    layers_differing, worst = [], 0.0
    for name in cpu.qlora_targets:
        mine, theirs = cpu.get_submodule(name), on_gpu.get_submodule(name)
        counts = compare_stored(stored_tensors(mine), stored_tensors(theirs))
        for role, (n, d) in counts.items():
            totals.setdefault(role, [0, 0])
            totals[role][0] += n
            totals[role][1] += d
        if any(d for _, d in counts.values()):
            layers_differing.append(name)
            a, b = quant.dequantize_module(mine).cpu(), quant.dequantize_module(theirs).float().cpu()
            worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item())
    # one weight of the 1B shape's MLP size, quantized directly
    out_f, in_f = (8192, 2048) if not ctx.smoke else (512, 256)
    w = (torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    if bits == 4:
        pc, sc = quant.quantize_4bit(w)
        pg, sg = quant.quantize_4bit(w.to(gpu))
        direct = compare_stored(
            {"weight": pc, "absmax": sc.absmax, "offset": sc.offset, "nested_absmax": sc.state2.absmax},
            {"weight": pg, "absmax": sg.absmax, "offset": sg.offset, "nested_absmax": sg.state2.absmax},
        )
    else:
        cc, rc = quant.quantize_8bit(w)
        cg, rg = quant.quantize_8bit(w.to(gpu))
        direct = compare_stored({"weight": cc, "row_scales": rc}, {"weight": cg, "row_scales": rg})
    differing = sum(d for _, d in totals.values()) + sum(d for _, d in direct.values())
    c.fig(
        layers=len(cpu.qlora_targets),
        bytes_by_role={role: {"bytes": n, "differing": d} for role, (n, d) in totals.items()},
        direct_weight=f"{out_f}x{in_f}",
        direct_bytes_by_role={role: {"bytes": n, "differing": d} for role, (n, d) in direct.items()},
        differing_bytes=differing,
        layers_differing=layers_differing[:8],
        dequantized_max_rel_diff=worst,
    )
    c.target(
        "0 differing bytes (then an adapter trained on the GPU exports exactly on a CPU, which re-quantizes)",
        differing == 0,
        differing,
    )


def compare_with_transformers(c: Check, ctx: Ctx, model_dir: Path, bits: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_lite import load_quantized

    device = "cuda" if ctx.cuda else "cpu"
    ours, _ = load_quantized(
        model_dir, bits=bits, quant_type="nf4", double_quant=True, device=device, load_tokenizer=False
    )
    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    theirs = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, dtype=torch.bfloat16, device_map={"": device}
    )
    for module in theirs.modules():  # the same CPU kernel as ours (no AVX512 repack at eval)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    ours.eval()
    theirs.eval()
    differing = total = 0
    for name in ours.qlora_targets:
        counts = compare_stored(stored_tensors(ours.get_submodule(name)), stored_tensors(theirs.get_submodule(name)))
        total += sum(n for n, _ in counts.values())
        differing += sum(d for _, d in counts.values())
    seq = 16 if ctx.smoke else 128
    ids = torch.randint(3, 259, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a = ours(input_ids=ids).logits.float()
        b = theirs(input_ids=ids).logits.float()
    rel = rel_err(a, b)
    c.fig(device=device, stored_bytes=total, stored_bytes_differing=differing, logits_rel_diff=rel,
          logits_max_abs_diff=(a - b).abs().max().item(), tokens=2 * seq)  # fmt: skip
    c.target("logits relative difference < 1e-3", rel < 1e-3, rel)
    c.target("identical stored bytes", differing == 0, differing)


def lora_vs_reference(c: Check, ctx: Ctx, bits: int) -> None:
    import torch

    from qlora_lite.model import quant
    from qlora_lite.model.lora import LoraLinear
    from qlora_lite.training.step import autocast_context

    device = torch.device("cuda" if ctx.cuda else "cpu")
    out_f, in_f, batch, seq = (2048, 2048, 2, 256) if not ctx.smoke else (256, 128, 2, 16)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16).to(device)
    if bits == 4:
        packed, state = quant.quantize_4bit(w)
        base = quant.make_linear4bit(packed, state, None, "nf4", True)
    else:
        codes, scales = quant.quantize_8bit(w)
        base = quant.make_linear8bit(codes, scales, None)
    layer = LoraLinear(base, r=16, alpha=32)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.05)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    layer.train()
    x = torch.randn(batch, seq, in_f, generator=g).to(torch.bfloat16).to(device).requires_grad_(True)
    upstream = torch.randn(batch, seq, out_f, generator=g).to(device)
    with autocast_context(device, True):  # as the trainer runs it
        y = layer(x)
    (y.float() * upstream).sum().backward()
    weight = quant.dequantize_module(base).double()
    a = layer.lora_A.weight.detach().double().requires_grad_(True)
    b = layer.lora_B.weight.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    ref = xr @ weight.T + layer.scaling * (xr @ a.T) @ b.T
    (ref * upstream.double()).sum().backward()
    errors = {
        "output": rel_err(y, ref),
        "grad_input": rel_err(x.grad, xr.grad),
        "grad_lora_A": rel_err(layer.lora_A.weight.grad, a.grad),
        "grad_lora_B": rel_err(layer.lora_B.weight.grad, b.grad),
    }
    c.fig(device=str(device), shape=f"[{batch}, {seq}, {in_f}] -> {out_f}, r=16", reference="fp64 with the dequantized weight",
          **{f"rel_err_{k}": v for k, v in errors.items()})  # fmt: skip
    c.target("each relative error < 2e-2 (bf16 compute)", max(errors.values()) < 2e-2, max(errors.values()))


def section_correctness(ctx: Ctx) -> None:
    require_cuda_if_asked(ctx)
    require_bnb()
    quiet()
    rec = ctx.rec
    model_dir = ensure_model(ctx, "small")
    rec.figure(model=model_spec("small", ctx.smoke)[0])
    for bits in (4, 8):
        name = "4-bit nf4 + double quant" if bits == 4 else "8-bit LLM.int8"
        with rec.check(f"{name} stored bytes: quantized on the GPU vs on the CPU") as c:
            if not ctx.cuda:
                c.skip("no CUDA")
            compare_packing(c, ctx, model_dir, bits)
    for bits in (4, 8):
        with rec.check(f"logits: load_quantized vs transformers BitsAndBytesConfig, {bits}-bit") as c:
            compare_with_transformers(c, ctx, model_dir, bits)
    for bits in (4, 8):
        with rec.check(f"LoRA layer output and gradients vs an fp64 reference, {bits}-bit base") as c:
            lora_vs_reference(c, ctx, bits)
    checks = {c["name"]: c for c in rec.data["checks"]}
    parts = []
    for name, c in checks.items():
        f = c["figures"]
        if "differing_bytes" in f:
            parts.append(f"{name.split(' stored')[0]}: {f['differing_bytes']} bytes differ")
        elif "logits_rel_diff" in f:
            parts.append(f"logits vs transformers {name[-5:]}: rel {fmt(f['logits_rel_diff'])}")
        elif "rel_err_output" in f:
            worst = max(v for k, v in f.items() if k.startswith("rel_err_"))
            parts.append(f"LoRA {name[-10:-5].strip()}: worst rel err {fmt(worst)}")
        elif c["status"] == "skipped":
            parts.append(f"{name.split(':')[0]}: skipped")
    rec.summary("; ".join(parts))


# -------------------------------------------------------------------------------------------- training


def train_settings(model_dir: Path, data: Path, out: Path, smoke: bool) -> dict:
    if smoke:
        train = dict(max_steps=6, micro_batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, save_every=3)
        seq, r = 32, 4
    else:
        train = dict(max_steps=30, micro_batch_size=4, grad_accum=2, lr=2e-3, warmup_steps=3, save_every=10)
        seq, r = 256, 16
    train.update(schedule="cosine", optimizer="paged_adamw_8bit", seed=7, log_every=1, eval_every=0, keep_checkpoints=2)
    return {
        "model": str(model_dir),
        "output_dir": str(out),
        "lora": {"r": r, "alpha": 2 * r, "dropout": 0.05},  # dropout: resume must restore the RNG states too
        "data": {"train": str(data), "max_seq_len": seq},
        "train": train,
    }


def api_train(config_path: Path) -> dict:
    """`qlora_lite.train` through the Python API in this process: what it started with and what it returned."""
    import torch

    import qlora_lite
    from qlora_lite.training.reporter import Reporter

    started: dict = {}

    class Start(Reporter):
        def on_start(self, info: dict) -> None:
            started.update(
                optimizer=info["optimizer"], device=info["device"], trainable_params=info["trainable_params"]
            )

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = qlora_lite.train(str(config_path), reporter=Start(), progress=False)
    peak = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
    return {**started, "steps": result.steps, "train_loss": result.train_loss, "seconds": result.seconds,
            "tokens": result.tokens, "peak_reserved": peak}  # fmt: skip


def tagged_json(text: str, tag: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    return None


def metrics_losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def adapter_difference(a: dict, b: dict) -> dict:
    import torch

    if a.keys() != b.keys():
        raise RuntimeError(f"the adapters hold different tensors: {sorted(a.keys() ^ b.keys())[:4]}")
    max_abs = max((x.double() - b[k].double()).abs().max().item() for k, x in a.items())
    num = sum(((x.double() - b[k].double()) ** 2).sum().item() for k, x in a.items()) ** 0.5
    den = sum((x.double() ** 2).sum().item() for x in a.values()) ** 0.5
    bitwise = all(torch.equal(x, b[k]) for k, x in a.items())
    return {"tensors": len(a), "max_abs_diff": max_abs, "rel_diff": num / max(den, 1e-30), "bitwise": bitwise}


def section_training(ctx: Ctx) -> None:
    require_cuda_if_asked(ctx)
    require_bnb()
    import yaml

    rec = ctx.rec
    model_dir = ensure_model(ctx, "small")
    root = ctx.work / "training"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    data = write_motif_records(root / "train.jsonl", 24 if ctx.smoke else 96, 48 if ctx.smoke else 320, seed=3)
    configs = {}
    for run in ("reference", "killed", "noise"):
        settings = train_settings(model_dir, data, root / run, ctx.smoke)
        configs[run] = root / f"{run}.yaml"
        configs[run].write_text(yaml.safe_dump(settings, sort_keys=False))
    s = train_settings(model_dir, data, root / "x", ctx.smoke)["train"]
    kill_at = s["save_every"]
    rec.figure(model=model_spec("small", ctx.smoke)[0], max_steps=s["max_steps"], micro_batch=s["micro_batch_size"],
               grad_accum=s["grad_accum"], seq_len=train_settings(model_dir, data, root, ctx.smoke)["data"]["max_seq_len"],
               optimizer=s["optimizer"], lr=s["lr"])  # fmt: skip
    env = child_env()
    reference_ok = False
    with rec.check("qlora_lite.train with paged_adamw_8bit: the loss falls") as c:
        result = api_train(configs["reference"])
        start = result
        losses = metrics_losses(root / "reference")
        first, last = losses[0][1], losses[-1][1]
        c.fig(optimizer_in_use=start.get("optimizer"), device=start.get("device"), steps=result.get("steps"),
              first_loss=first, last_loss=last, seconds=result.get("seconds"),
              tokens_per_s=result["tokens"] / result["seconds"] if result.get("seconds") else None,
              peak_reserved_gib=result["peak_reserved"] / GiB if result.get("peak_reserved") else None)  # fmt: skip
        if not ctx.cuda:
            c.note("off CUDA the trainer runs paged_adamw_8bit as adamw_8bit (no paged memory)")
        c.target("last logged loss < first logged loss", last < first, f"{first:.4f} -> {last:.4f}")
        reference_ok = True
    with rec.check(f"SIGKILL after the step-{kill_at} checkpoint, then --resume: the uninterrupted run's adapter") as c:
        if not reference_ok:
            c.skip("the uninterrupted reference run failed")
        cli = [sys.executable, "-m", "qlora_lite", "train", str(configs["killed"])]
        killed = run_logged(cli, ctx.time_left(), child_env(**{KILL_ENV: f"after-checkpoint:{kill_at}"}), cwd=root)
        checkpoints = sorted(p.name for p in (root / "killed" / "checkpoints").glob("step-*"))
        c.fig(
            kill_point=f"{KILL_ENV}=after-checkpoint:{kill_at}",
            killed=describe_exit(killed.returncode),
            checkpoints_left=checkpoints,
        )
        if killed.returncode != -signal.SIGKILL:
            raise RuntimeError(
                f"the run was to be SIGKILLed after its step-{kill_at} checkpoint but ended with {describe_exit(killed.returncode)}: {tail(killed.stderr, 600)}"
            )
        resumed = run_logged(cli + ["--resume"], ctx.time_left(), env, cwd=root)
        if resumed.returncode != 0:
            raise RuntimeError(f"--resume failed ({describe_exit(resumed.returncode)}): {tail(resumed.stderr, 800)}")
        said = re.search(r"resuming from step (\d+)", resumed.stdout)
        diff = adapter_difference(adapter_tensors(root / "reference"), adapter_tensors(root / "killed"))
        ref_losses, res_losses = metrics_losses(root / "reference"), metrics_losses(root / "killed")
        same_steps = [s for s, _ in ref_losses] == [s for s, _ in res_losses]
        loss_diff = max(abs(a[1] - b[1]) for a, b in zip(ref_losses, res_losses)) if same_steps else None
        c.fig(
            resumed_from=int(said.group(1)) if said else None,
            **diff,
            logged_steps_match=same_steps,
            logged_loss_max_abs_diff=loss_diff,
        )
        if ctx.cuda:
            c.target("adapter within 1e-2 relative of the uninterrupted run's (bitwise is reported; CUDA kernels with atomics are not bitwise run to run)",
                     diff["rel_diff"] <= 1e-2, diff["rel_diff"])  # fmt: skip
        else:
            c.target(
                "adapter bitwise equal to the uninterrupted run's (max abs diff 0)",
                diff["max_abs_diff"] == 0,
                diff["max_abs_diff"],
            )
    if ctx.cuda:
        with rec.check("noise floor: a second uninterrupted run against the first") as c:
            if not reference_ok:
                c.skip("the uninterrupted reference run failed")
            ctx.need(25, "a second uninterrupted run")
            api_train(configs["noise"])
            c.fig(**adapter_difference(adapter_tensors(root / "reference"), adapter_tensors(root / "noise")))
            c.note(
                "if two uninterrupted runs differ as much as the resumed one, the difference is the kernels', not resume's"
            )
    checks = rec.data["checks"]
    parts = []
    if checks and "first_loss" in checks[0]["figures"]:
        f = checks[0]["figures"]
        parts.append(f"loss {f['first_loss']:.4f} -> {f['last_loss']:.4f} ({f['optimizer_in_use']})")
    if len(checks) > 1 and "max_abs_diff" in checks[1]["figures"]:
        f = checks[1]["figures"]
        parts.append(f"resume: max |diff| {fmt(f['max_abs_diff'])}, rel {fmt(f['rel_diff'])}, bitwise {f['bitwise']}")
    if len(checks) > 2 and "max_abs_diff" in checks[2]["figures"]:
        parts.append(f"two uninterrupted runs: max |diff| {fmt(checks[2]['figures']['max_abs_diff'])}")
    rec.summary("; ".join(parts))


# -------------------------------------------------------------------------------------------- speed


def bench_child_main(payload: str) -> int:
    """One side of tools/bench.py in this fresh process (its own `child`), on a model written by the suite."""
    p = json.loads(payload)
    bench = import_tool("bench")
    if p["model"] not in bench.MODELS:
        bench.MODELS[p["model"]] = p["spec"]
    elif bench.MODELS[p["model"]] != p["spec"]:
        raise SystemExit(f"tools/bench.py's {p['model']} is {bench.MODELS[p['model']]}, not {p['spec']}")
    keys = ("device", "model", "seq_len", "micro_batch", "steps", "warmup", "rank", "alpha", "lr", "optimizer", "seed",
            "loss_chunk", "checkpoint_every", "offload", "side", "model_dir")  # fmt: skip
    result = bench.child(argparse.Namespace(**{k: p[k] for k in keys}))
    print(json.dumps(result), flush=True)
    return 0


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def speed_figures(runs: list[dict], baselines: tuple[str, ...], mem_key: str, cuda: bool) -> dict:
    """Medians per side and, against each baseline, the median of the per-repeat ratios (each repeat's qlora-lite
    figure over the same repeat's baseline figure, as tools/bench.py reports them)."""
    by_side = {side: [r for r in runs if r["side"] == side] for side in ("qlora", *baselines)}
    figures: dict = {"memory_measure": mem_key}
    for side, rs in by_side.items():
        figures[f"tokens_per_s_{side}"] = median([r["tokens_per_s"] for r in rs])
        figures[f"peak_{side}_gib"] = median([r[mem_key] for r in rs]) / GiB
    ours = {r["repeat"]: r for r in by_side["qlora"]}
    for base in baselines:
        pairs = [(ours[r["repeat"]], r) for r in by_side[base] if r["repeat"] in ours]
        figures[f"tokens_per_s_ratio_{base}"] = median([q["tokens_per_s"] / b["tokens_per_s"] for q, b in pairs])
        figures[f"peak_ratio_{base}"] = median([q[mem_key] / b[mem_key] for q, b in pairs])
        if cuda:
            figures[f"peak_allocated_ratio_{base}"] = median(
                [q["max_allocated"] / b["max_allocated"] for q, b in pairs]
            )
    first = {side: rs[0]["losses"][0] for side, rs in by_side.items()}
    figures.update(
        first_step_loss=first,
        last_step_loss={side: rs[0]["losses"][-1] for side, rs in by_side.items()},
        first_step_loss_rel_diff=abs(first["qlora"] - first[baselines[0]]) / abs(first[baselines[0]]),
    )
    return figures


def section_speed(ctx: Ctx) -> None:
    require_cuda_if_asked(ctx)
    require_bnb()
    if importlib.util.find_spec("peft") is None:
        raise Skip("peft is not installed (the baseline side needs it)")
    rec = ctx.rec
    model_dir = ensure_model(ctx, "big")
    name, spec, _ = model_spec("big", ctx.smoke)
    full = not ctx.smoke
    payload = dict(device="cuda" if ctx.cuda else "cpu", model=name, spec=spec, model_dir=str(model_dir),
                   seq_len=2048 if full else 64, micro_batch=1, steps=10 if full else 3, warmup=3 if full else 1,
                   rank=16, alpha=32.0, lr=2e-4, optimizer="paged_adamw_8bit", seed=0, loss_chunk=128, checkpoint_every=1,
                   offload=False)  # fmt: skip
    rec.figure(model=name, **{k: payload[k] for k in ("seq_len", "micro_batch", "steps", "warmup", "optimizer", "rank")},
               command_equivalent=f"python tools/bench.py --device {payload['device']} --model {name} --seq-len {payload['seq_len']} "
               f"--micro-batch 1 --steps {payload['steps']} --warmup {payload['warmup']} --optimizer paged_adamw_8bit")  # fmt: skip
    runs: list[dict] = []
    baselines = ("lean", "common")  # tools/bench.py's two: without / with prepare_model_for_kbit_training
    with rec.check("tokens/s and peak memory: qlora-lite vs transformers + peft + bitsandbytes") as c:
        repeats = 2 if full else 1
        per_run = None
        for repeat in range(repeats):
            if repeat and per_run and ctx.time_left() < 3 * per_run + 10:
                c.note(
                    f"one repeat only: {ctx.time_left():.0f} s of the time box left, a repeat takes ~{3 * per_run:.0f} s"
                )
                break
            order = ("lean", "qlora", "common") if repeat % 2 == 0 else ("common", "qlora", "lean")  # as tools/bench.py
            for side in order:
                started = time.perf_counter()
                proc = run_logged([sys.executable, str(THIS), "--bench-child", json.dumps({**payload, "side": side})],
                                  ctx.time_left(), child_env(PYTHONWARNINGS="ignore"))  # fmt: skip
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"bench side {side} failed ({describe_exit(proc.returncode)}): {tail(proc.stderr, 800)}"
                    )
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result.update(seconds=round(time.perf_counter() - started, 1), repeat=repeat)
                per_run = max(per_run or 0, result["seconds"])
                runs.append(result)
                keys = ("side", "repeat", "tokens_per_s", "max_reserved", "max_allocated", "train_peak_rss", "seconds")
                c.fig(runs=[{k: r.get(k) for k in keys} for r in runs])
        mem_key = "max_reserved" if ctx.cuda else "train_peak_rss"
        figures = speed_figures(runs, baselines, mem_key, ctx.cuda)
        c.fig(**figures)
        if full:
            c.target(
                "tokens/s >= 1.5x the lean baseline's (docs/benchmarks.md's target)",
                figures["tokens_per_s_ratio_lean"] >= 1.5,
                figures["tokens_per_s_ratio_lean"],
            )
            c.target(
                "peak reserved <= 0.7x the lean baseline's (docs/benchmarks.md's target)",
                figures["peak_ratio_lean"] <= 0.7,
                figures["peak_ratio_lean"],
            )
        else:
            c.note("smoke shapes: the ratios only show that the sides run; they say nothing about speed")
        c.target(
            "first-step loss within 1e-3 relative of the lean baseline's",
            figures["first_step_loss_rel_diff"] <= 1e-3,
            figures["first_step_loss_rel_diff"],
        )
    with rec.check("loss chunk of 512 tokens against the default 128: qlora-lite tokens/s") as c:
        # whether a larger chunk pays on a GPU (docs/benchmarks.md estimates ~1.5 % of a step from lm_head's weight
        # reads); the default stays 128 until this has run
        ours = [r for r in runs if r["side"] == "qlora"]
        if not ours:
            c.skip("qlora-lite's speed was not measured")
        per_run = max(r["seconds"] for r in ours)
        if ctx.time_left() < per_run + 10:
            c.skip(f"{ctx.time_left():.0f} s of the time box left, a run takes ~{per_run:.0f} s")
        larger = {**payload, "side": "qlora", "loss_chunk": 512}
        proc = run_logged([sys.executable, str(THIS), "--bench-child", json.dumps(larger)], ctx.time_left(),
                          child_env(PYTHONWARNINGS="ignore"))  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"the chunk-512 run failed ({describe_exit(proc.returncode)}): {tail(proc.stderr, 800)}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        default = median([r["tokens_per_s"] for r in ours])
        mem_key = "max_reserved" if ctx.cuda else "train_peak_rss"
        c.fig(tokens_per_s_chunk128=default, tokens_per_s_chunk512=result["tokens_per_s"],
              speed_ratio_512_over_128=result["tokens_per_s"] / default,
              peak_ratio_512_over_128=result[mem_key] / median([r[mem_key] for r in ours]))  # fmt: skip
        c.note("one chunk-512 run against the median of the default runs above; not alternated")
    with rec.check("MFU against 6 * N * tokens/s") as c:
        if not ctx.cuda:
            c.skip("no CUDA")
        if not runs:
            c.skip("no tokens/s was measured")
        import torch

        from qlora_lite.memory.inventory import build_inventory

        n_params = build_inventory(model_dir).total_params
        gpu = torch.cuda.get_device_name(0)
        peak, row = (ctx.peak_tflops, "--peak-tflops") if ctx.peak_tflops else peak_bf16_tflops(gpu)
        tps_q = median([r["tokens_per_s"] for r in runs if r["side"] == "qlora"])
        baseline = [r["tokens_per_s"] for r in runs if r["side"] == "lean"]
        tps_b = median(baseline) if baseline else None
        achieved = 6 * n_params * tps_q / 1e12
        c.fig(parameters=n_params, gpu=gpu, peak_bf16_tflops=peak, peak_source=row or "unknown GPU: pass --peak-tflops",
              achieved_tflops_6NT=achieved, mfu_qlora=achieved / peak if peak else None,
              mfu_baseline=6 * n_params * tps_b / 1e12 / peak if peak and tps_b else None)  # fmt: skip
        measured = ctx.earlier("environment")
        gemm = next(
            (ch["figures"].get("matmul_bf16_tflops") for ch in measured.get("checks", []) if ch.get("name") == "GPU"),
            None,
        )
        if gemm:
            c.fig(matmul_bf16_tflops=gemm, fraction_of_measured_matmul=achieved / gemm)
        c.note(
            "N counts every parameter (embeddings and lm_head included); 6*N*tokens/s is the dense-training bound "
            "(a frozen base does less work: no weight gradients, but checkpointing recomputes the forward)"
        )
    f = {k: v for ch in rec.data["checks"] for k, v in ch["figures"].items()}
    parts = []
    if "tokens_per_s_ratio_lean" in f:
        parts.append(
            f"tokens/s {f['tokens_per_s_qlora']:.0f} vs lean {f['tokens_per_s_lean']:.0f} "
            f"({f['tokens_per_s_ratio_lean']:.2f}x), vs common {f['tokens_per_s_common']:.0f} "
            f"({f['tokens_per_s_ratio_common']:.2f}x)"
        )
        parts.append(f"peak {'reserved' if ctx.cuda else 'RSS'} {f['peak_ratio_lean']:.2f}x lean")
    if f.get("mfu_qlora") is not None:
        parts.append(f"MFU {100 * f['mfu_qlora']:.1f}% of {f['peak_bf16_tflops']:.0f} TFLOP/s ({f['peak_source']})")
    rec.summary("; ".join(parts))


# -------------------------------------------------------------------------------------------- memory report


def grid_points(seqs: tuple[int, int], batches: tuple[int, int]) -> list[tuple]:
    """The 16 points (bits, seq, batch, checkpointing), the 8 of a half fraction first (each setting 4 times, each
    pair of settings balanced), then the other 8."""
    import itertools

    points = list(itertools.product((4, 8), seqs, batches, (True, False)))

    def parity(p):
        return ((p[0] == 8) + (p[1] == seqs[1]) + (p[2] == batches[1]) + (not p[3])) % 2

    return [p for p in points if parity(p) == 0] + [p for p in points if parity(p) == 1]


def section_memory_report(ctx: Ctx) -> None:
    require_cuda_if_asked(ctx)
    require_bnb()
    quiet()
    rec = ctx.rec
    mm = import_tool("measure_memory")
    model_dir = ensure_model(ctx, "big")
    seqs, batches = ((512, 2048), (1, 4)) if not ctx.smoke else ((32, 64), (1, 2))
    points = grid_points(seqs, batches)
    points = points[:8] if ctx.smoke else points  # the half fraction; a GPU run goes on to all 16 while time allows
    args = argparse.Namespace(rank=16, targets="all-linear", optimizer="paged_adamw_8bit", steps=1 if ctx.smoke else 2, grad_accum=2,
                              loss_chunk=128, tolerance=0.10, grid="_gpu_suite", tiny=False)  # fmt: skip
    kind = (
        "reserved (torch.cuda.max_memory_reserved)"
        if ctx.cuda
        else "live tensor bytes (CPU proxy: probe.AllocationTracker)"
    )
    rec.figure(model=model_spec("big", ctx.smoke)[0], measured=kind, steps_per_point=args.steps, grad_accum=args.grad_accum,
               optimizer=args.optimizer, rank=args.rank, tolerance=args.tolerance,
               command_equivalent="python tools/measure_memory.py --model-dir MODEL --grid full" if ctx.cuda else
               "python tools/measure_memory.py --device cpu --model-dir MODEL")  # fmt: skip
    rows: list[dict] = []
    with rec.check("predicted vs measured peak at each grid point") as c:
        slowest = 0.0
        for i, (bits, seq, batch, ckpt) in enumerate(points):
            if ctx.time_left() < slowest * 1.3 + 3:
                c.note(f"stopped after {i} of {len(points)} points: {ctx.time_left():.0f} s of the time box left")
                break
            mm.GRIDS[args.grid] = [(bits, seq, batch, ckpt)]
            started = time.perf_counter()
            point = {"bits": bits, "seq_len": seq, "batch_size": batch, "checkpointing": ckpt}
            try:
                raw = (mm.measure_cuda if ctx.cuda else mm.measure_cpu)(args, model_dir)[0]
            except Exception as exc:
                raw = {"error": one_line(exc, 300)}
                print(traceback.format_exc(), flush=True)
            seconds = time.perf_counter() - started
            slowest = max(slowest, seconds)
            point["seconds"] = round(seconds, 1)
            if "error" in raw:
                point["error"] = raw["error"]
            elif ctx.cuda:
                point.update(predicted=raw["predicted_reserved"], measured=raw["measured_reserved"],
                             predicted_allocated=raw["predicted_allocated"], measured_allocated=raw["measured_allocated"],
                             error_allocated=raw["predicted_allocated"] / raw["measured_allocated"] - 1,
                             phase=raw["predicted_phase"])  # fmt: skip
            else:
                point.update(predicted=raw["peak_predicted"], measured=raw["peak_measured"], phase=raw["predicted_phase"],
                             exact_components=not raw["exact_mismatches"],
                             stored_predicted=raw["stored_predicted"], stored_measured=raw["stored_measured"])  # fmt: skip
            if "measured" in point:
                point["error"] = point["predicted"] / point["measured"] - 1
                point["predicted_gib"], point["measured_gib"] = point["predicted"] / GiB, point["measured"] / GiB
            rows.append(point)
            c.fig(points=rows)
        measured = [r for r in rows if "measured" in r]
        within = [r for r in measured if abs(r["error"]) <= args.tolerance]
        worst = max(measured, key=lambda r: abs(r["error"]), default=None)
        c.fig(points_measured=len(measured), points_within_tolerance=len(within),
              worst_error=worst["error"] if worst else None, mean_abs_error=sum(abs(r["error"]) for r in measured) / len(measured) if measured else None)  # fmt: skip
        c.target("at least 8 points measured", len(measured) >= 8, len(measured))
        c.target(f"every measured point's prediction within ±{args.tolerance:.0%}", len(within) == len(measured) and bool(measured),
                 f"{len(within)}/{len(measured)}")  # fmt: skip
        if not ctx.cuda:
            exact = [r for r in measured if r.get("exact_components")]
            c.target(
                "weights, adapters, gradients and optimizer state predicted byte for byte",
                len(exact) == len(measured),
                f"{len(exact)}/{len(measured)}",
            )
    f = rec.data["checks"][0]["figures"] if rec.data["checks"] else {}
    if f.get("points_measured"):
        rec.summary(f"{f['points_within_tolerance']}/{f['points_measured']} points within ±10%, worst {100 * f['worst_error']:+.1f}%, "
                    f"mean |error| {100 * f['mean_abs_error']:.1f}%")  # fmt: skip


# -------------------------------------------------------------------------------------------- out of memory

CAPPED_CLI = """
import os, sys, json
import torch
cap = int(os.environ.get("GPU_SUITE_CAP_BYTES", "0"))
if cap and torch.cuda.is_available():
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
from qlora_lite.cli.app import main
code = main(sys.argv[1:])
if torch.cuda.is_available():
    print("GPU_SUITE_PEAK " + json.dumps({"reserved": torch.cuda.max_memory_reserved(),
          "allocated": torch.cuda.max_memory_allocated()}), flush=True)
sys.exit(code)
"""


def parse_advice(stderr: str) -> dict:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]

    def first(prefix):
        return next((line for line in lines if line.startswith(prefix)), None)

    run = first("run:")
    flags = re.findall(r"--((?:train|data|lora|quant)\.\w+) (\S+)", run or "")
    return {"error": first("error:"), "memory": first("memory:"), "fix": first("fix:"), "run": run, "note": first("note:"),
            "flags": flags, "resume": bool(run and "--resume" in run)}  # fmt: skip


def section_oom(ctx: Ctx) -> None:
    require_cuda_if_asked(ctx)
    require_bnb()
    import yaml

    rec = ctx.rec
    root = ctx.work / "oom"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    simulated = ctx.smoke  # tiny shapes cannot be squeezed meaningfully: the trainer's own test hook raises the OOM
    model_dir = ensure_model(ctx, "big")
    if simulated:
        train = dict(max_steps=2, micro_batch_size=2, grad_accum=1, save_every=1, gradient_checkpointing=True)
        seq, n, length = 32, 8, 48
    else:
        train = dict(max_steps=2, micro_batch_size=8, grad_accum=1, save_every=0, gradient_checkpointing=False)
        seq, n, length = 2048, 32, 2200
    train.update(lr=2e-4, warmup_steps=0, log_every=1, eval_every=0, optimizer="paged_adamw_8bit", seed=0)
    data = write_motif_records(root / "train.jsonl", n, length, seed=5)
    settings = {"model": str(model_dir), "output_dir": str(root / "squeezed"), "lora": {"r": 16, "alpha": 32},
                "data": {"train": str(data), "max_seq_len": seq}, "train": train}  # fmt: skip
    cfg = root / "squeezed.yaml"
    cfg.write_text(yaml.safe_dump(settings, sort_keys=False))
    if simulated:
        from dataclasses import asdict

        from qlora_lite.config.load import load_config
        from qlora_lite.memory.oom import memory_settings
        from qlora_lite.memory.report import estimate_memory

        predicted = estimate_memory(model_dir, **asdict(memory_settings(load_config(cfg, {})))).total
        cap, budget = 0, f"{predicted - 1}B"  # one byte under the prediction, as tests/test_faults.py does
        env = {GPU_MEMORY_ENV: budget}
        first_env = {**env, OOM_ENV: "step:1"}
        rec.figure(
            mode=f"simulated: {OOM_ENV}=step:1 raises torch.OutOfMemoryError, {GPU_MEMORY_ENV}={budget} (one byte under the prediction)"
        )
    else:
        cap = 12 * GiB
        env = {GPU_MEMORY_ENV: "12GiB", "GPU_SUITE_CAP_BYTES": str(cap)}
        first_env = env
        rec.figure(mode="torch.cuda.set_per_process_memory_fraction(12 GiB / total) in the training process; "
                        f"{GPU_MEMORY_ENV}=12GiB so the advice plans for the cap")  # fmt: skip
    rec.figure(model=model_spec("big", ctx.smoke)[0], settings=f"micro-batch {train['micro_batch_size']} x {seq} tokens, "
               f"gradient checkpointing {'on' if train['gradient_checkpointing'] else 'off'}, grad_accum 1")  # fmt: skip
    advice = None
    with rec.check("squeezed run: exit 3 with the memory advice") as c:
        proc = run_logged(
            [sys.executable, "-c", CAPPED_CLI, "train", str(cfg)], ctx.time_left(), child_env(**first_env), cwd=root
        )
        advice = parse_advice(proc.stderr)
        peak = tagged_json(proc.stdout, "GPU_SUITE_PEAK")
        c.fig(exit_code=proc.returncode, advice_lines=[advice[k] for k in ("error", "memory", "note", "fix", "run") if advice[k]],
              advised_flags=advice["flags"], advised_resume=advice["resume"],
              peak_reserved_gib=peak["reserved"] / GiB if peak else None)  # fmt: skip
        if proc.returncode not in (0, 3):
            raise RuntimeError(
                f"the squeezed run ended with {describe_exit(proc.returncode)}, neither 3 nor 0: {tail(proc.stderr, 800)}"
            )
        c.target("exit code 3", proc.returncode == 3, proc.returncode)
        c.target(
            "the advice names a setting change (fix: and run: lines)",
            bool(advice["fix"] and advice["flags"]),
            advice["fix"],
        )
    with rec.check("the advised setting trains under the same cap") as c:
        if not advice or not advice["flags"]:
            c.skip("the squeezed run gave no setting to try")
        cmd = [sys.executable, "-c", CAPPED_CLI, "train", str(cfg)]
        for key, value in advice["flags"]:
            cmd += [f"--{key}", value]
        if advice["resume"]:
            cmd.append("--resume")
        else:
            cmd += ["--output_dir", str(root / "advised")]
        proc = run_logged(cmd, ctx.time_left(), child_env(**env), cwd=root)
        peak = tagged_json(proc.stdout, "GPU_SUITE_PEAK")
        c.fig(command_flags=" ".join(cmd[4:]), exit_code=proc.returncode,
              peak_reserved_gib=peak["reserved"] / GiB if peak else None, cap_gib=cap / GiB if cap else None)  # fmt: skip
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"the advised run ended with {describe_exit(proc.returncode)}: {tail(proc.stderr, 800)}")
        c.target("exit code 0", proc.returncode == 0, proc.returncode)
        if cap and peak:
            c.target("peak reserved within the cap", peak["reserved"] <= cap, f"{peak['reserved'] / GiB:.2f} GiB")
    checks = rec.data["checks"]
    if checks and "exit_code" in checks[0]["figures"]:
        f0 = checks[0]["figures"]
        text = f"squeezed: exit {f0['exit_code']}, advice {' '.join(f'--{k} {v}' for k, v in f0['advised_flags']) or 'none'}"
        if len(checks) > 1 and "exit_code" in checks[1]["figures"]:
            f1 = checks[1]["figures"]
            text += f"; advised run: exit {f1['exit_code']}"
            if f1.get("peak_reserved_gib") is not None and f1.get("cap_gib"):
                text += f", peak reserved {f1['peak_reserved_gib']:.2f} of {f1['cap_gib']:.0f} GiB"
        rec.summary(text)


# -------------------------------------------------------------------------------------------- longest context


def snapper(step: int, limit: int):
    """Round a length down to a multiple of `step`, within [step, limit]."""
    return lambda n: int(max(step, min(limit, n // step * step)))


def search_longest(
    attempt, warm: dict, predicted: int, limit: int, step: int, time_left, note, progress=lambda tries: None
):
    """The longest length that `attempt` says fits: the prediction first; while everything fits, up by 15 %, then by
    half again each time; while nothing does, down by 15 %, then by 40 % each time; then bisection to 3 % (or `step`),
    as long as `time_left()` covers the next try's estimated time. `warm` is a short try that fitted.
    Returns (longest fitting, shortest failing or None, the tries)."""
    snap = snapper(step, limit)
    tries: list[dict] = []
    lo, hi = warm["seq_len"], None  # lo trains, hi does not
    cand, tried = snap(predicted), set()
    while cand not in tried:
        # the next try's time: from the nearest shorter try, growing with the length between linearly and
        # quadratically (attention); from the warm-up's short length, linearly (its time is mostly overhead)
        shorter = [t for t in [warm, *tries] if t["seq_len"] <= cand] or [warm]
        base = max(shorter, key=lambda t: t["seq_len"])
        estimate = base["seconds"] * (cand / base["seq_len"]) ** (1.0 if base is warm else 1.5) + 2
        if time_left() < estimate:
            note(f"search stopped by the time box before trying {cand} tokens (~{estimate:.0f} s)")
            break
        tried.add(cand)
        last = attempt(cand)
        tries.append(last)
        progress(tries)
        if last["fits"]:
            lo = max(lo, cand)
        else:
            hi = cand if hi is None else min(hi, cand)
        if hi is None:
            if lo >= limit:
                note(f"the model's context limit ({limit}) trains under the cap")
                break
            cand = snap(max(lo * (1.15 if len(tries) == 1 else 1.5), lo + step))
        elif hi - lo <= max(step, int(0.03 * lo)):
            break
        elif not any(t["fits"] for t in tries) and hi * 0.6 > lo + step:
            cand = snap(hi * (0.85 if len(tries) == 1 else 0.6))
        else:
            cand = snap((lo + hi) // 2)
    return lo, hi, tries


def section_longest_context(ctx: Ctx) -> None:
    require_cuda_if_asked(ctx)
    require_bnb()
    quiet()
    import gc

    import torch

    from qlora_lite.memory.advice import largest_fitting, longest_sequence
    from qlora_lite.memory.inventory import build_inventory
    from qlora_lite.memory.probe import AllocationTracker, unique_bytes
    from qlora_lite.memory.report import report_for, with_settings
    from qlora_lite.memory.settings import make_settings
    from qlora_lite.training.step import NonFiniteStepError

    rec = ctx.rec
    mm = import_tool("measure_memory")
    model_dir = ensure_model(ctx, "big")
    device = "cuda" if ctx.cuda else "cpu"
    simulated = ctx.smoke
    inv = build_inventory(model_dir)
    report = report_for(inv, make_settings(seq_len=64, batch_size=1, grad_accum=1, device=device))
    limit = inv.max_positions
    step = 16 if simulated else 1024
    if simulated:
        # a pretend cap: the predicted allocated peak at 3/8 of the context; measured as live tensor bytes
        def allocated(n: int) -> int:  # torch's allocator only: paged optimizer state is outside it
            r = report_for(inv, with_settings(report, seq_len=n))
            return r.allocated_peak - r.paged_bytes

        cap = allocated(limit * 3 // 8)
        predicted = largest_fitting(lambda n: allocated(n) <= cap, 1, limit)
        rec.figure(
            mode="simulated: live tensor bytes (probe.AllocationTracker) against a pretend cap, the predicted allocated peak at 3/8 of the context"
        )
    else:
        cap = 24 * GiB
        total = torch.cuda.get_device_properties(0).total_memory
        if total < cap:
            raise Skip(f"the GPU has {total / GiB:.1f} GiB, less than the 24 GiB cap")
        torch.cuda.set_per_process_memory_fraction(cap / total)
        predicted, limit = longest_sequence(inv, report, cap)
        rec.figure(mode="torch.cuda.set_per_process_memory_fraction(24 GiB / total); predicted: qlora-lite memory's "
                        "longest sequence at micro-batch 1 (memory.advice.longest_sequence) for a 24 GiB budget")  # fmt: skip
    rec.figure(model=model_spec("big", ctx.smoke)[0], cap_bytes=cap, cap_gib=cap / GiB, predicted_longest=predicted, context_limit=limit,
               settings="4-bit nf4, r=16 all-linear, gradient checkpointing, chunked loss, paged_adamw_8bit, micro-batch 1, one step per size")  # fmt: skip
    with rec.check("longest sequence that trains under the cap vs the prediction") as c:
        model, opt = mm.prepare(model_dir, 4, 16, "all-linear", True, "paged_adamw_8bit", device)
        vocab = inv.vocab

        def attempt(seq: int) -> dict:
            ids = torch.randint(0, vocab, (1, seq), device=device)
            started = time.perf_counter()
            entry = {"seq_len": seq}
            try:
                if simulated:
                    kept = list(model.parameters()) + list(model.buffers()) + opt.masters
                    if opt.name != "paged_adamw_8bit":  # paged state lives outside torch's allocator (CUDA only)
                        kept += opt.state_tensors()
                    before = unique_bytes(kept)
                    with AllocationTracker() as tracker:
                        mm.train_steps(model, opt, ids, 1, 1, device)
                    entry["peak_bytes"] = before + tracker.peak
                    entry["fits"] = entry["peak_bytes"] <= cap
                else:
                    torch.cuda.reset_peak_memory_stats()
                    mm.train_steps(model, opt, ids, 1, 1, device)
                    torch.cuda.synchronize()
                    entry["fits"] = True
                    entry["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
            except torch.OutOfMemoryError:
                entry["fits"] = False
            except (RuntimeError, NonFiniteStepError) as exc:
                # a library's own allocation failure under the cap (cuBLAS, a kernel) is out of memory too
                text = str(exc)
                if isinstance(exc, NonFiniteStepError):  # the step ran its forward and backward: its memory fitted
                    entry.update(fits=True, note=one_line(exc, 200))
                elif "out of memory" in text.lower() or "ALLOC_FAILED" in text:
                    entry.update(fits=False, note=one_line(exc, 200))
                else:
                    raise
            finally:
                del ids
                opt.zero_grad()
                for p in model.parameters():
                    p.grad = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            entry["seconds"] = round(time.perf_counter() - started, 2)
            print(f"seq {seq}: {'fits' if entry['fits'] else 'out of memory'} in {entry['seconds']} s", flush=True)
            return entry

        warm = attempt(step * 2)  # the optimizer state exists after the first step
        c.fig(warm_up=warm)
        if not warm["fits"]:
            raise RuntimeError(f"even {step * 2} tokens do not train under the cap")

        lo, hi, tries = search_longest(attempt, warm, predicted, limit, step, ctx.time_left, c.note,
                                       lambda t: c.fig(tries=t))  # fmt: skip
        snap = snapper(step, limit)
        predicted_try = next((t for t in tries if t["seq_len"] == snap(predicted)), None)
        c.fig(measured_longest=lo, shortest_failing=hi, resolution=max(step, int(0.03 * lo)),
              predicted_over_measured=predicted / lo if lo else None,
              predicted_length_trains=predicted_try["fits"] if predicted_try else None)  # fmt: skip
        if simulated:  # at tiny shapes the fixed bytes dominate: a few % of memory is a large share of the length
            c.note("simulated at tiny shapes: the length ratio is shown, not held to ±10%")
        else:
            c.target("predicted longest sequence within ±10% of the measured", abs(predicted / lo - 1) <= 0.10 if lo else False,
                     f"{predicted} vs {lo}")  # fmt: skip
        if predicted_try is not None:
            c.target(
                "the predicted length trains (the advice is safe)", predicted_try["fits"], predicted_try["seq_len"]
            )
    f = rec.data["checks"][0]["figures"] if rec.data["checks"] else {}
    if f.get("measured_longest"):
        rec.summary(f"measured longest {f['measured_longest']} tokens (first failing {f['shortest_failing']}), predicted {predicted} "
                    f"({f['predicted_over_measured']:.3f}x) under " + (f"{cap / 2**20:.1f} MiB (simulated)" if simulated else f"{cap / GiB:.0f} GiB"))  # fmt: skip


SECTION_FUNCS = {
    "environment": section_environment,
    "correctness": section_correctness,
    "training": section_training,
    "speed": section_speed,
    "memory_report": section_memory_report,
    "oom": section_oom,
    "longest_context": section_longest_context,
}


def watch_parent() -> None:
    """End this section's process group (this process and what it started) if the suite that started it dies."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                os._exit(137)

    threading.Thread(target=watch, name="gpu-suite-parent-watch", daemon=True).start()


def child_main(args) -> int:
    """Run one section in this (fresh) process and leave its result in --result."""
    watch_parent()
    rec = Recorder(Path(args.result))
    ctx = Ctx(args, rec)
    os.chdir(ctx.work)
    try:
        if args.fail == "raise":
            raise RuntimeError("forced failure (--fail-section), to test that the suite goes on")
        if args.fail == "hang":
            print("hanging on purpose (--fail-section NAME:hang)", flush=True)
            time.sleep(10**6)
        quiet()
        SECTION_FUNCS[args.child](ctx)
        rec.finish()
    except Skip as exc:
        rec.finish(status="skipped", reason=str(exc))
    except Exception as exc:
        rec.data["traceback"] = tail(traceback.format_exc(), 3000)
        rec.finish(status="failed", error=one_line(exc, 600))
        traceback.print_exc()
        return 1
    return 0


# ============================================================================================ the parent side


class Suite:
    """Runs the sections one by one in subprocesses and keeps gpu-report.json / gpu-report.md current."""

    def __init__(self, args, argv: list[str]):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.own_work = args.work is None
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu-suite-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.started = time.time()
        self.budget = args.budget_s or DEFAULT_BUDGET_S[args.smoke]
        self.selected = [name for name in SECTION_NAMES if name in args.sections]
        self.fail = dict(args.fail_section)
        self.boxes = {name: (smoke_box if args.smoke else box) for name, _, box, smoke_box in SECTIONS}
        self.boxes.update(dict(args.time_box))
        self.proc: subprocess.Popen | None = None
        self.log = self.out / "gpu-suite.log"
        self.log.write_text("")
        self.report = {
            "tool": "tools/gpu_suite.py",
            "command": shlex.join([sys.executable, "tools/gpu_suite.py", *argv]),
            "device": args.device,
            "smoke": args.smoke,
            "started": now_iso(),
            "updated": now_iso(),
            "finished": None,
            "budget_s": self.budget,
            "elapsed_s": 0.0,
            "git": git_commit(),
            "work_dir": str(self.work),
            "sections": [
                {
                    "name": name,
                    "title": dict((n, t) for n, t, *_ in SECTIONS)[name],
                    "status": "pending",
                    "time_box_s": self.boxes[name],
                }  # fmt: skip
                for name in self.selected
            ],
        }
        self.write()

    # ------------------------------------------------------------------ reports
    def section(self, name: str) -> dict:
        return next(s for s in self.report["sections"] if s["name"] == name)

    def write(self) -> None:
        self.report["updated"] = now_iso()
        self.report["elapsed_s"] = round(time.time() - self.started, 1)
        counts = {}
        met = missed = 0
        for s in self.report["sections"]:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
            for c in s.get("checks", []):
                for t in c.get("targets", []):
                    met += t["met"]
                    missed += not t["met"]
        self.report["totals"] = {**counts, "targets_met": met, "targets_missed": missed}
        write_json_atomic(self.out / "gpu-report.json", self.report)
        write_text_atomic(self.out / "gpu-report.md", render_markdown(self.report))

    # ------------------------------------------------------------------ running
    def timeout_for(self, index: int) -> float:
        name = self.selected[index]
        left = self.budget - (time.time() - self.started)
        later = sum(min(FLOOR_S, self.boxes[n]) for n in self.selected[index + 1 :])
        return min(self.boxes[name], left - later) if left - later >= MIN_SECTION_S else min(self.boxes[name], left)

    def run(self) -> int:
        for index, name in enumerate(self.selected):
            entry = self.section(name)
            timeout = self.timeout_for(index)
            if timeout < min(MIN_SECTION_S, self.boxes[name]):
                entry.update(status="skipped", reason=f"the suite's time budget (--budget-s {self.budget:.0f}) was spent "
                             f"({time.time() - self.started:.0f} s elapsed)")  # fmt: skip
                self.write()
                continue
            self.run_section(entry, timeout)
        self.report["finished"] = now_iso()
        self.write()
        self.print_summary()
        return 1 if any(s["status"] == "failed" for s in self.report["sections"]) else 0

    def run_section(self, entry: dict, timeout: float) -> None:
        name = entry["name"]
        result_path = self.work / f"result-{name}.json"
        result_path.unlink(missing_ok=True)
        log_path = self.work / "logs" / f"{name}.log"
        margin = min(20.0, 0.15 * timeout)
        started = time.time()
        cmd = [sys.executable, str(THIS), "--child", name, "--device", self.args.device, "--work", str(self.work),
               "--result", str(result_path), "--report", str(self.out / "gpu-report.json"),
               "--deadline", f"{started + timeout - margin:.3f}"]  # fmt: skip
        if self.args.smoke:
            cmd.append("--smoke")
        if self.args.peak_tflops:
            cmd += ["--peak-tflops", str(self.args.peak_tflops)]
        if name in self.fail:
            cmd += ["--fail", self.fail[name]]
        entry.update(status="running", started=now_iso(), time_box_s=round(timeout, 1))
        self.write()
        print(f"[{time.time() - self.started:6.1f} s] {name}: running (time box {timeout:.0f} s)", flush=True)
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=str(REPO),
                                         start_new_session=True)  # fmt: skip
            timed_out = False
            last_merge = time.time()
            while self.proc.poll() is None:
                if time.time() - started > timeout:
                    timed_out = True
                    self.kill_child()
                    break
                time.sleep(0.2)
                if time.time() - last_merge > 5:
                    self.merge(entry, result_path, final=False)
                    self.write()
                    last_merge = time.time()
            rc = self.proc.wait()
            self.proc = None
        entry["seconds"] = round(time.time() - started, 1)
        self.merge(entry, result_path, final=True)
        if timed_out:
            entry.update(
                status="failed",
                error=f"timed out after {timeout:.0f} s (its time box); the child was killed, its partial figures are kept",
            )
            self.mark_unfinished_checks(entry, "timed out")
        elif entry.get("status") in (None, "running", "pending"):
            entry.update(
                status="failed",
                error=f"the section's process ended with {describe_exit(rc)} before recording a result (a crash?)",
            )
            self.mark_unfinished_checks(entry, describe_exit(rc))
        log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
        entry["log_tail"] = tail(log_text, 2500)
        with open(self.log, "a") as f:
            f.write(f"\n===== {name} ({entry['status']}, {entry['seconds']} s) =====\n{tail(log_text, 200_000)}\n")
        self.write()
        print(f"[{time.time() - self.started:6.1f} s] {name}: {entry['status']} in {entry['seconds']} s"
              + (f": {entry.get('summary')}" if entry.get("summary") else "")
              + (f" ({entry.get('reason') or entry.get('error')})" if entry["status"] != "ok" else ""), flush=True)  # fmt: skip

    @staticmethod
    def mark_unfinished_checks(entry: dict, why: str) -> None:
        for c in entry.get("checks", []):
            if c.get("status") == "running":
                c.update(status="failed", error=f"unfinished: {why}")

    def merge(self, entry: dict, result_path: Path, final: bool) -> None:
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            return
        for key in ("summary", "figures", "checks", "notes", "reason", "error", "traceback"):
            if key in result:
                entry[key] = result[key]
        if final or result.get("status") not in ("running", None):
            entry["status"] = result.get("status", entry.get("status"))

    def kill_child(self) -> None:
        """End the running section's process group (the section and every process it started)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def interrupted(self, signum: int) -> None:
        """SIGTERM / Ctrl-C to the suite: stop the running section, record it, write the reports, exit."""
        self.kill_child()
        for s in self.report["sections"]:
            if s["status"] == "running":
                s.update(
                    status="failed", error=f"the suite was stopped by {signal.Signals(signum).name} during this section"
                )
                self.mark_unfinished_checks(s, "suite stopped")
            elif s["status"] == "pending":
                s.update(
                    status="skipped",
                    reason=f"the suite was stopped by {signal.Signals(signum).name} before this section",
                )
        self.report["finished"] = now_iso()
        self.write()

    def print_summary(self) -> None:
        t = self.report["totals"]
        print(f"\n{self.out / 'gpu-report.md'}: {self.report['elapsed_s']:.0f} s; "
              + ", ".join(f"{k} {v}" for k, v in t.items()), flush=True)  # fmt: skip

    def cleanup(self) -> None:
        if self.own_work and not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


# -------------------------------------------------------------------------------------------- Markdown


def md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(rows: list[dict], limit_cols: int = 12) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    keys = keys[:limit_cols]
    out = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(md_cell(fmt(r.get(k, ""))) for k in keys) + " |")
    return out


def md_figures(figures: dict) -> list[str]:
    lines, tables = [], []
    for key, value in figures.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        elif key.endswith("_bytes") and isinstance(value, int) and value > 2**20:
            lines.append(f"- {key}: {value} ({value / GiB:.3f} GiB)")
        else:
            lines.append(f"- {key}: {md_cell(fmt(value))}")
    for key, rows in tables:
        lines += ["", f"{key}:", "", *md_table(rows)]
    return lines


def render_markdown(report: dict) -> str:
    env = next((s for s in report["sections"] if s["name"] == "environment"), {})
    lines = [
        "# GPU suite report",
        "",
        f"- command: `{report['command']}`",
        f"- device: {report['device']}{' (smoke: tiny shapes)' if report['smoke'] else ''}"
        + (f"; {env['summary']}" if env.get("summary") else ""),
        f"- started {report['started']}, updated {report['updated']}, "
        + (f"finished {report['finished']}" if report.get("finished") else "**not finished**")
        + f"; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget",
        f"- git: {report.get('git') or 'unknown'}",
        "- totals: " + ", ".join(f"{k} {v}" for k, v in report.get("totals", {}).items()),
        "",
        "| section | status | seconds | result |",
        "| --- | --- | ---: | --- |",
    ]
    for s in report["sections"]:
        result = s.get("summary") or s.get("reason") or s.get("error") or ""
        if s["status"] == "failed" and s.get("error") and s.get("summary"):
            result = f"{s['summary']} — **{s['error']}**"
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {md_cell(result)} |")
    for s in report["sections"]:
        lines += ["", f"## {s['name']}: {s.get('title', '')}", "", f"status: **{s['status']}**"
                  + (f" — {s.get('reason')}" if s.get("reason") else "") + (f" — {s.get('error')}" if s.get("error") else "")]  # fmt: skip
        if s.get("time_box_s"):
            lines.append(f"(time box {s['time_box_s']} s, took {s.get('seconds', '?')} s)")
        if s.get("summary"):
            lines += ["", s["summary"]]
        if s.get("figures"):
            lines += ["", *md_figures(s["figures"])]
        for note in s.get("notes", []):
            lines.append(f"- note: {note}")
        for c in s.get("checks", []):
            head = f"### {c['name']}: {c['status']}"
            if c.get("reason"):
                head += f" ({c['reason']})"
            if c.get("error"):
                head += f" — {c['error']}"
            lines += ["", head]
            if c.get("figures"):
                lines += ["", *md_figures(c["figures"])]
            for t in c.get("targets", []):
                lines.append(
                    f"- target: {t['target']}: **{'met' if t['met'] else 'MISSED'}** ({md_cell(fmt(t.get('value')))})"
                )
            for note in c.get("notes", []):
                lines.append(f"- note: {note}")
        if s["status"] == "failed" and s.get("log_tail"):
            lines += ["", "log tail:", "", "```", s["log_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


# ============================================================================================ main


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--out", default="gpu-report", help="directory for gpu-report.json, gpu-report.md and gpu-suite.log"
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few steps (always on with --device cpu)")
    parser.add_argument(
        "--sections", default=",".join(SECTION_NAMES), help=f"comma-separated subset of {','.join(SECTION_NAMES)}"
    )
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"total seconds for all sections (default {DEFAULT_BUDGET_S[False]}; {DEFAULT_BUDGET_S[True]} with --smoke)")  # fmt: skip
    parser.add_argument(
        "--time-box", action="append", default=[], metavar="SECTION=SECONDS", help="override one section's time box"
    )
    parser.add_argument("--fail-section", action="append", default=[], metavar="SECTION[:hang]",
                        help="testing: make SECTION raise at its start (or hang, to test its time box); also env " + FAIL_ENV)  # fmt: skip
    parser.add_argument(
        "--work", default=None, help="work directory for models and runs (default: a temporary one, removed)"
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work directory")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak for MFU, if not in the table"
    )
    # the child side (internal)
    parser.add_argument("--child", default=None, choices=SECTION_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fail", default=None, choices=["raise", "hang"], help=argparse.SUPPRESS)
    parser.add_argument("--bench-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child or args.bench_child:
        return args
    if args.device == "cpu":
        args.smoke = True
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTION_NAMES]
    if unknown or not sections:
        parser.error(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTION_NAMES)}"
        )
    args.sections = sections
    fails = list(args.fail_section) + [f for f in os.environ.get(FAIL_ENV, "").split(",") if f.strip()]
    parsed = []
    for spec in fails:
        name, _, mode = spec.strip().partition(":")
        if name not in SECTION_NAMES or mode not in ("", "hang"):
            parser.error(
                f"--fail-section {spec!r}: use SECTION or SECTION:hang with SECTION one of {', '.join(SECTION_NAMES)}"
            )
        parsed.append((name, mode or "raise"))
    args.fail_section = parsed
    boxes = []
    for spec in args.time_box:
        name, _, seconds = spec.partition("=")
        try:
            boxes.append((name, float(seconds)))
        except ValueError:
            parser.error(f"--time-box {spec!r}: use SECTION=SECONDS")
        if name not in SECTION_NAMES:
            parser.error(f"--time-box {spec!r}: unknown section {name!r}")
    args.time_box = boxes
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.bench_child:
        return bench_child_main(args.bench_child)
    if args.child:
        return child_main(args)
    suite = Suite(args, argv)

    def stop(signum, frame):
        suite.interrupted(signum)
        suite.cleanup()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"gpu suite: {', '.join(suite.selected)} on {args.device}{' (smoke)' if args.smoke else ''}, "
          f"budget {suite.budget:.0f} s; reports in {suite.out}", flush=True)  # fmt: skip
    try:
        return suite.run()
    finally:
        suite.cleanup()


if __name__ == "__main__":
    sys.exit(main())
