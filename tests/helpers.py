"""Small numeric helpers shared by the tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def load_tool(name: str) -> ModuleType:
    """Import `tools/<name>.py` (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_cache_entry(
    hf_home: Path, repo_id: str, source: Path, repo_type: str = "model", revision: str = "0" * 40
) -> Path:
    """Lay out `source`'s files in a Hugging Face cache under `hf_home` as the hub client does
    (`hub/models--Org--Name/{blobs,snapshots/<rev>,refs/main}`, snapshot files linking to blobs); return the snapshot."""
    import hashlib
    import shutil

    repo = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under a directory, by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden(directory: Path) -> list[str]:
    """Names in a directory that start with a dot (temporaries, lock files)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def one_error_line(err: str) -> str:
    """The single `error: ...` line of a CLI's stderr (asserting there is exactly one and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def torchrun(
    args: list[str], nproc: int = 2, timeout: float = 240, env: dict[str, str] | None = None, extra: list[str] = ()
):
    """Run `torchrun --standalone --nproc_per_node N ARGS` (one thread per rank, gloo on the CPU) with a timeout;
    return the CompletedProcess (stdout and stderr as text). `extra` goes to torchrun before ARGS."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("QLORA_LITE_FAULT", None)
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if not any(a.startswith("--rdzv") or a.startswith("--nnodes") for a in extra):
        launcher.append("--standalone")
    command = [*launcher, f"--nproc_per_node={nproc}", *extra, *args]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)
