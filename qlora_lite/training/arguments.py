"""`train()`'s arguments checked before anything is touched: the config (a `TrainConfig` rebuilt through the
schema, or a YAML path), the keyword arguments, and the output directory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..config.load import config_from_dict, load_config
from ..config.settings import TrainConfig
from ..errors import ConfigError
from .reporter import Reporter


def plain(value: Any) -> Any:
    """A config as nested dicts, lists and scalars (paths as strings), to be built again through the schema."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def as_config(config: TrainConfig | str | Path) -> TrainConfig:
    """A validated config from a `TrainConfig` (rebuilt through the schema, so wrong types set in Python are
    refused as a YAML file's would be) or from the path of a YAML file."""
    if isinstance(config, TrainConfig):
        checked = config_from_dict(plain(config))
        checked.validate()
        return checked
    path = os.fspath(config) if isinstance(config, os.PathLike) else config
    if not isinstance(path, str):
        hint = (
            " (qlora_lite.config.load.config_from_dict builds one from nested dicts)" if isinstance(path, dict) else ""
        )
        raise ConfigError(
            f"train() takes a TrainConfig or the path of a YAML config, not a {type(config).__name__}{hint}."
        )
    if not path or "\0" in path:
        raise ConfigError(f"config path {path!r} is not a file name; give the path of a YAML training config.")
    try:
        return load_config(path)
    except OSError as exc:  # a name the file system refuses (too long, a loop of links)
        raise ConfigError(
            f"config file {path} cannot be read ({exc.strerror or exc}); give the path of a YAML config."
        ) from None


def check_call(resume: Any, allow_data_change: Any, reporter: Any, progress: Any = True) -> None:
    """Refuse arguments of `train` that are not what they must be, before anything is touched."""
    for name, value in (("resume", resume), ("allow_data_change", allow_data_change), ("progress", progress)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}.")
    if allow_data_change and not resume:
        raise ConfigError(
            "--allow-data-change (allow_data_change=True) only applies when resuming; add --resume or drop it."
        )
    if reporter is not None and not isinstance(reporter, Reporter):
        raise ConfigError(
            f"reporter must be a qlora_lite.training.reporter.Reporter (a subclass of it), got {type(reporter).__name__}."
        )


def check_output_parent(out: Path) -> None:
    """Refuse an output_dir below a file (the lock and the run dir could not be made; mkdir would raise
    FileExistsError or NotADirectoryError)."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output_dir {out} cannot be made: {parent} is a file; choose another output_dir.")
            return


def check_output_dir(out: Path, resume: bool) -> None:
    """Refuse an output_dir that is a file, a folder of the user's, or (without resume) a run that has started."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; choose an empty or new output_dir.")
    # A lock file alone (".qlora-lite.lock", kept inside run dirs by earlier versions) leaves a folder "empty".
    names = {p.name for p in out.iterdir()} - {".qlora-lite.lock"} if out.is_dir() else set()
    if names and not names & {"checkpoints", "metrics.jsonl", "config.yaml", "adapter"}:
        raise ConfigError(
            f"{out} is not empty and is not a qlora-lite run directory; choose an empty or new output_dir."
        )
    if resume:
        return
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) or (out / "metrics.jsonl").exists():
        raise ConfigError(
            f"{out} already holds a training run; pass --resume (resume=True) to continue it or choose another output_dir."
        )
