"""The checkpoint format and resume policy: write a checkpoint atomically, check one, find the newest good one.

A checkpoint (`checkpoints/step-N/`) holds the PEFT adapter, optimizer.pt (its layout, flat or per-tensor under
FSDP, the fp32 masters per tensor and the inner AdamW states, tensors only, loaded with `weights_only=True`),
rng.safetensors, trainer_state.json (step, data position, schedule, logging window, tokens and loss-carrying tokens
so far, the settings fingerprint, the data files' sizes and sha256) and a `COMPLETE` marker written last, listing
every file with its size and sha256.

Resume policy: a changed fingerprinted setting is refused; a changed data file is refused unless the caller
allows it; a changed schedule setting (max_steps or the length epochs makes, lr, warmup_steps, schedule) is
allowed and said.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..config.settings import TrainConfig, TrainSettings, resume_keys
from ..errors import ConfigError, DataError, QloraLiteError, TrainingError
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


def data_fingerprint(config: TrainConfig) -> dict:
    """What the run trains and evaluates on, by role ("train", "eval"; "train[1]" for the second of several
    sources): a file's path, size and sha256, or a Hugging Face dataset's name (its contents are not
    fingerprinted). A file that cannot be read is left out: loading the data reports it."""
    found: dict[str, dict] = {}
    for role in ("train", "eval"):
        value = getattr(config.data, role)
        if isinstance(value, list):
            named = [
                (f"{role}[{i}]", item.get("path") if isinstance(item, dict) else item) for i, item in enumerate(value)
            ]
        else:
            named = [(role, value)]
        for name, source in named:
            if not source or not isinstance(source, str):
                continue
            path = Path(source)
            try:
                if path.is_file():
                    found[name] = {"file": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
                elif not path.exists():
                    found[name] = {"dataset": str(source)}
            except OSError:
                continue
    return found


def check_resume_data(state: dict, now: dict, path: Path, allow_change: bool) -> list[str]:
    """Refuse (`DataError`) to resume on a data file whose size or sha256 differs from the one the checkpoint
    recorded, unless `allow_change`; then return one notice per changed file (or one saying that a checkpoint of
    an earlier version recorded none)."""
    if not isinstance(state.get("data_files"), dict):
        return [
            f"checkpoint {path.name} records no fingerprint of its data (an earlier qlora-lite wrote it), so a change "
            "of the data files since then cannot be detected"
        ]
    notices = []
    for role, before in state["data_files"].items():
        after = now.get(role) or {}
        if not isinstance(before, dict) or "sha256" not in before or "sha256" not in after:
            continue  # a hub dataset, or a file that loading will report as missing
        if (before.get("bytes"), before["sha256"]) == (after["bytes"], after["sha256"]):
            continue
        what = (
            f"data.{role} file {after['file']} changed since checkpoint {path} was written "
            f"({before.get('bytes')} bytes, sha256 {str(before['sha256'])[:12]} then; "
            f"{after['bytes']} bytes, sha256 {after['sha256'][:12]} now)"
        )
        if not allow_change:
            raise DataError(
                f"{what}; put the original file back, start a new output_dir, or pass --allow-data-change "
                "(allow_data_change=True) to resume on the new data."
            )
        notices.append(
            f"{what}; resuming on the new data as --allow-data-change asks: the batch order continues from the "
            "checkpoint's position over the new records"
        )
    return notices


def schedule_notices(
    state: dict, s: TrainSettings, path: Path, steps: int | None = None, per_epoch: int | None = None
) -> list[str]:
    """What a resumed run's changed schedule settings change, one notice each; `ConfigError` for a run length
    below the checkpoint's step (the run would end already past it).

    `steps` is this run's length (default `train.max_steps`; with `train.epochs`, `schedule.run_steps`), and
    `per_epoch` its micro-batches per epoch (to say which `train.epochs` reaches the checkpoint).
    """
    step, steps = state["step"], s.max_steps if steps is None else steps
    by_epochs = s.max_steps <= 0
    if steps < step:
        if by_epochs:
            least = f"{step * s.grad_accum / per_epoch:.4g} or more" if per_epoch else "higher"
            raise ConfigError(
                f"train.epochs = {s.epochs!r} makes a run of {steps} steps but checkpoint {path} is at step {step}; "
                f"set train.epochs to {least}, or take the adapter of an earlier checkpoint."
            )
        raise ConfigError(
            f"train.max_steps is {s.max_steps} but checkpoint {path} is at step {step}; set train.max_steps to "
            f"{step} or more, or take the adapter of an earlier checkpoint."
        )
    saved = state.get("schedule") if isinstance(state.get("schedule"), dict) else {}
    notices = []
    old = saved.get("max_steps")
    if isinstance(old, int) and old != steps:
        what = (
            f"the run's length (train.epochs = {s.epochs!r}) changed from {old} to {steps} steps"
            if by_epochs
            else f"train.max_steps changed from {old} to {steps}"
        )
        # a warmup longer than the run is clipped to its length (schedule.warmup_for), so the length can move it
        saved_warmup = saved.get("warmup_steps") if isinstance(saved.get("warmup_steps"), int) else s.warmup_steps
        warmup_then, warmup_now = min(saved_warmup, old), min(s.warmup_steps, steps)
        first = max(step + 1, warmup_now + 2)  # the cosine's progress is 0 at warmup + 1 whatever the length is
        if steps == step:
            notices.append(
                f"{what}, the step of checkpoint {path.name}: no step is left to run, so only the final adapter "
                "is written"
            )
        elif warmup_then != warmup_now and saved_warmup == s.warmup_steps:
            notices.append(
                f"{what}: train.warmup_steps = {s.warmup_steps} is clipped to the run's length, so the warmup now "
                f"spans {warmup_now} steps instead of {warmup_then} and the learning rate from step {step + 1} on "
                "differs from the first run's"
            )
        elif s.schedule == "cosine" and first <= steps:
            notices.append(
                f"{what}: the cosine schedule now decays over {steps} steps, so the learning rate from step "
                f"{first} on differs from the first run's"
            )
        else:
            notices.append(
                f"{what}: the {s.schedule} schedule does not depend on it for steps {step + 1} to {steps}, so only "
                "the run's length changes"
            )
    names = {"name": "schedule", "lr": "lr", "warmup_steps": "warmup_steps"}
    for key, name in names.items():
        before, now = saved.get(key), getattr(s, name)
        if before is not None and before != now:
            notices.append(
                f"train.{name} changed from {before!r} to {now!r}: the learning rate from step {step + 1} on "
                "follows the new setting"
            )
    return notices


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


def rank_rng_tensors(rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One rank of a torchrun launch's generator states, keyed `rank{R}.cpu` (and `rank{R}.cuda` for its GPU)."""
    tensors = {f"rank{rank}.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors[f"rank{rank}.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def check_resume_world(state: dict, ranks: int, path: Path) -> None:
    """Refuse to resume with another number of ranks than the checkpoint was written by (each rank's RNG state and
    the step's global batch of micro-batch x grad_accum x ranks belong to that number)."""
    saved = state.get("world", {}).get("size", 1) if isinstance(state.get("world"), dict) else 1
    if saved != ranks:

        def launch(n: int) -> str:
            return "one process" if n == 1 else f"{n} ranks"

        raise ConfigError(
            f"checkpoint {path} was written by {launch(saved)} but this run has {launch(ranks)}; resume with the "
            f"same number of ranks (torchrun --nproc_per_node x --nnodes = {saved}) or start a new output_dir."
        )


def save_checkpoint(
    root: Path,
    step: int,
    model,
    optimizer: AdapterOptimizer,
    trainer_state: dict,
    rng: dict | None = None,
    adapter_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoints/step-N atomically: built in a temporary dir, the marker written last, then renamed.

    Contents: adapter/ (PEFT format), optimizer.pt (fp32 masters + inner AdamW state, tensors only),
    rng.safetensors (torch CPU/CUDA generator states), trainer_state.json (step, data position,
    schedule, logging window, settings fingerprint), COMPLETE. `rng` replaces this process's generator states
    (a torchrun launch passes every rank's, gathered). A sharded (FSDP) run passes its adapter gathered whole
    (`adapter_state`) and every rank's optimizer state (`optimizer_state`: {"name", "ranks": [state of rank 0, ...]}).
    """
    final = root / f"step-{step}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter", adapter_state)
        with atomic_file(tmp / "optimizer.pt") as f:
            torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), f)
        save_safetensors_atomic(rng if rng is not None else _rng_tensors(), tmp / "rng.safetensors")
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


def _bad_checkpoint(path: Path, problem: str) -> TrainingError:
    return TrainingError(f"checkpoint {path} {problem}; delete this checkpoint to resume from an older one.")


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json, checked to hold what resuming reads (`TrainingError` if not)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _bad_checkpoint(path, f"has an unreadable trainer_state.json ({exc})") from None
    ints = ("step", "window_steps", "tokens")
    ok = isinstance(state, dict) and all(type(state.get(k)) is int and state[k] >= 0 for k in ints)
    ok = ok and type(state.get("window_loss_sum")) in (int, float)
    # written since train.epochs and the window's tokens/s (an older checkpoint lacks them: they count from here)
    ok = ok and all(type(state.get(k, 0)) is int and state.get(k, 0) >= 0 for k in ("target_tokens", "window_tokens"))
    ok = ok and type(state.get("window_seconds", 0.0)) in (int, float) and state.get("window_seconds", 0.0) >= 0
    data = state.get("data") if ok else None
    ok = ok and isinstance(data, dict) and all(type(data.get(k)) is int and data[k] >= 0 for k in ("epoch", "index"))
    if not ok:
        raise _bad_checkpoint(path, "has a trainer_state.json without the step, data position or logging window")
    match = CHECKPOINT_PATTERN.match(path.name)
    if match and int(match.group(1)) != state["step"]:
        raise _bad_checkpoint(path, f"holds the trainer state of step {state['step']}")
    return state


def _load_optimizer_state(path: Path, optimizer: AdapterOptimizer, device: torch.device, rank: int | None) -> None:
    file = path / "optimizer.pt"
    try:
        saved = torch.load(file, map_location=device, weights_only=True)
    except Exception as exc:  # a damaged zip or pickle stream surfaces as many types (RuntimeError, KeyError, EOFError)
        if type(exc).__name__ == "UnpicklingError":  # torch's own text advises weights_only=False: never to be taken
            raise TrainingError(
                f"{file} holds objects other than tensors; qlora-lite never unpickles them; "
                "delete this checkpoint to resume from an older one."
            ) from None
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise TrainingError(
            f"{file} cannot be read ({type(exc).__name__}: {first}); delete this checkpoint to resume from an older one."
        ) from None
    if isinstance(saved, dict) and isinstance(saved.get("ranks"), list):  # a sharded run: each rank its own shard
        saved = saved["ranks"][rank or 0] if (rank or 0) < len(saved["ranks"]) else None
    masters = saved.get("masters") if isinstance(saved, dict) else None
    if not (isinstance(masters, list) and all(isinstance(t, torch.Tensor) for t in masters)):
        raise TrainingError(
            f"{file} does not hold an optimizer state written by qlora-lite; "
            "delete this checkpoint to resume from an older one."
        )
    try:
        optimizer.load_state_dict(saved)
    except QloraLiteError:
        raise
    except (
        Exception
    ) as exc:  # torch's optimizers raise ValueError, KeyError or RuntimeError for a state that does not fit
        raise TrainingError(
            f"{file} does not fit this run's adapters ({str(exc).splitlines()[0][:120]}); "
            "resume with the checkpoint's settings or delete this checkpoint to resume from an older one."
        ) from None


def restore_checkpoint(path: Path, optimizer: AdapterOptimizer, device: torch.device, rank: int | None = None) -> dict:
    """Load optimizer (and with it the adapter weights) and RNG states from a checkpoint; return its trainer state.
    `rank` (a torchrun launch) restores that rank's generator states."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(
            f"checkpoint {path} cannot be resumed from ({problem}); delete it and resume from an older one."
        )
    state = read_trainer_state(path)
    _load_optimizer_state(path, optimizer, device, rank)
    try:
        rng = SafetensorsFile(path / "rng.safetensors")
        if rank is not None:
            torch.set_rng_state(rng.read(f"rank{rank}.cpu"))
            if device.type == "cuda" and f"rank{rank}.cuda" in rng.keys():
                torch.cuda.set_rng_state(rng.read(f"rank{rank}.cuda"), device)
            return state
        torch.set_rng_state(rng.read("cpu"))
        cuda_states = [rng.read(k) for k in sorted(k for k in rng.keys() if k.startswith("cuda."))]
    except Exception as exc:  # a damaged header (the reader's own error) or a state of the wrong dtype or size
        raise _bad_checkpoint(path, f"has an unusable rng.safetensors ({str(exc).splitlines()[0][:120]})") from None
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
