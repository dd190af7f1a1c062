"""The demo's shipped base model (`assets/base/`): what made it, and installing a checked copy of it.

The asset is a tiny Llama-shaped model (hidden 64, 2 layers, byte-level tokenizer) pre-trained to copy
words; `tools/make_demo_base.py` makes it and records how in `pretrain.json` (seed, steps, copy-task eval
loss, library versions, sha256 of model.safetensors).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..errors import ModelLoadError
from ..io.atomic import atomic_dir

BASE_ASSET = Path(__file__).resolve().parent / "assets" / "base"
INFO_FILE = "pretrain.json"
WEIGHTS_FILE = "model.safetensors"


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_info(asset: Path = BASE_ASSET) -> dict:
    """The asset's `pretrain.json`, or a `ModelLoadError` saying the asset is missing or unreadable."""
    path = asset / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"the demo's base model is missing or broken ({path}: {exc.__class__.__name__}); reinstall qlora-lite, "
            "or re-create it with `python tools/make_demo_base.py` from a source checkout."
        ) from None
    return info


def install_base(dest: Path, asset: Path = BASE_ASSET) -> dict:
    """Copy the shipped base into `dest` (replacing it atomically) after checking its weights' sha256; returns its info."""
    info = base_info(asset)
    weights = asset / WEIGHTS_FILE
    actual = sha256_of(weights) if weights.is_file() else "missing"
    if actual != info.get("sha256"):
        raise ModelLoadError(
            f"the demo's base model weights {weights} do not match the sha256 in {asset / INFO_FILE} "
            f"({actual[:12]} vs {str(info.get('sha256'))[:12]}); reinstall qlora-lite or re-run tools/make_demo_base.py."
        )
    with atomic_dir(dest, overwrite=True) as tmp:
        for item in sorted(asset.iterdir()):
            if item.is_file() and not item.name.startswith("."):
                shutil.copyfile(item, tmp / item.name)
    return info
