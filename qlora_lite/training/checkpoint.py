"""The checkpoint format and resume policy: write a checkpoint atomically, check one, find the newest good one.

A checkpoint (`checkpoints/step-N/`) holds the PEFT adapter, optimizer.pt (fp32 masters + inner AdamW state,
tensors only, loaded with `weights_only=True`), rng.safetensors, trainer_state.json (step, data position,
schedule, logging window, the settings fingerprint) and a `COMPLETE` marker written last, listing every file
with its size and sha256.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..config.settings import TrainConfig, resume_keys
from ..errors import ConfigError, TrainingError
from ..export.adapter import save_adapter
from ..io.atomic import (
    atomic_dir,
    atomic_file,
    file_sha256,
    remove_stale_temps,
    save_safetensors_atomic,
    write_json_atomic,
)
from ..io.faults import fault_point
from ..io.safetensors import SafetensorsFile
from .optim import AdapterOptimizer

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


def fingerprint(config: TrainConfig) -> dict:
    """The settings a resumed run must share with its checkpoint, as {dotted key: value}."""
    return {key: config.get(key) for key in resume_keys()}


def check_resume_settings(state: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to resume when a fingerprinted setting differs from the checkpoint's."""
    saved, now = state.get("fingerprint", {}), fingerprint(config)
    for key in now:
        if key in saved and saved[key] != now[key]:
            raise ConfigError(
                f"checkpoint {path} was made with {key}={saved[key]!r} but this config has {key}={now[key]!r}; "
                "resume with the checkpoint's settings or start a new output_dir."
            )


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (named step-N and holding the completion marker), oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run dir, or None."""
    found = checkpoint_dirs(output_dir)
    return found[-1][1] if found else None


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return tensors


def save_checkpoint(root: Path, step: int, model, optimizer: AdapterOptimizer, trainer_state: dict) -> Path:
    """Write checkpoints/step-N atomically: built in a temporary dir, the marker written last, then renamed.

    Contents: adapter/ (PEFT format), optimizer.pt (fp32 masters + inner AdamW state, tensors only),
    rng.safetensors (torch CPU/CUDA generator states), trainer_state.json (step, data position,
    schedule, logging window, settings fingerprint), COMPLETE.
    """
    final = root / f"step-{step}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter")
        with atomic_file(tmp / "optimizer.pt") as f:
            torch.save(optimizer.state_dict(), f)
        save_safetensors_atomic(_rng_tensors(), tmp / "rng.safetensors")
        write_json_atomic(tmp / "trainer_state.json", trainer_state)
        fault_point("in-checkpoint", step)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        # sizes and digests let resume tell a complete checkpoint from one whose files were damaged after the fact
        checksums = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)} for name in files}
        write_json_atomic(tmp / COMPLETE_MARKER, {"step": step, "files": files, "checksums": checksums})
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from (no marker, a listed file missing, truncated or
    changed since it was written), or None when every file matches the size and sha256 its marker records."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker"
    try:
        record = json.loads(marker.read_text())
        listed = [str(name) for name in record["files"]]
        checksums = record.get("checksums") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"unreadable {COMPLETE_MARKER} marker"
    for name in listed:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        expected = checksums.get(name)
        if expected is None:
            continue  # a checkpoint from before checksums were recorded: presence is all that can be checked
        size = file.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes where {COMPLETE_MARKER} records {expected.get('bytes')}"
        if file_sha256(file) != expected.get("sha256"):
            return f"the sha256 of {name} differs from the one {COMPLETE_MARKER} records"
    return None


def restore_checkpoint(path: Path, optimizer: AdapterOptimizer, device: torch.device) -> dict:
    """Load optimizer (and with it the adapter weights) and RNG states from a checkpoint; return its trainer state."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(
            f"checkpoint {path} cannot be resumed from ({problem}); delete it and resume from an older one."
        )
    state = json.loads((path / "trainer_state.json").read_text())
    saved = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(saved)
    rng = SafetensorsFile(path / "rng.safetensors")
    torch.set_rng_state(rng.read("cpu"))
    cuda_states = [rng.read(k) for k in sorted(k for k in rng.keys() if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for _, path in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes `checkpoint_problem`, and one notice for each thing skipped or removed.

    Leftovers of killed writes (`.step-N.*.tmp` dirs, step-N dirs without the marker, a half-written final
    adapter) and checkpoints whose files do not match their marker are deleted, so pruning never counts them
    as kept checkpoints. Only checkpoints newer than the chosen one are checksummed.
    """
    notices: list[str] = []
    root = output_dir / "checkpoints"
    steps = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        half_written = re.match(r"^\.step-(\d+)\..+\.tmp$", path.name)
        match = CHECKPOINT_PATTERN.match(path.name)
        if path.is_dir() and half_written:
            notices.append(
                f"skipped incomplete checkpoint step-{half_written.group(1)} (no {COMPLETE_MARKER} marker, "
                "its write was interrupted) and removed it"
            )
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and match:
            steps.append((int(match.group(1)), path))
    chosen = None
    for step, path in sorted(steps, reverse=True):
        marked = (path / COMPLETE_MARKER).is_file()
        if marked and chosen is not None:
            continue
        problem = checkpoint_problem(path) if marked else f"no {COMPLETE_MARKER} marker"
        if problem is None:
            chosen = path
            continue
        notices.append(
            f"skipped {'corrupted' if marked else 'incomplete'} checkpoint step-{step} ({problem}) and removed it"
        )
        shutil.rmtree(path, ignore_errors=True)
    for leftover in remove_stale_temps(output_dir / "adapter"):
        notices.append(f"removed {leftover.name}, left by an interrupted write of the final adapter")
    for name in ("metrics.jsonl", "config.yaml"):
        remove_stale_temps(output_dir / name)
    if chosen is None:
        notices.append(f"found no complete checkpoint in {root}, so training starts from step 0")
    return chosen, notices
