"""A model to talk to: a base with an adapter, quantized as it was trained, or a merged / plain model dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError


@dataclass
class LoadedModel:
    """The model in eval mode, its tokenizer, and where each came from (for messages)."""

    model: torch.nn.Module
    tokenizer: object
    description: str


def _tokenizer_for(model_dir: Path, adapter_dir: Path | None, trust_remote_code: bool):
    """The adapter's own tokenizer (it carries the chat template training used) when it has one, else the model's."""
    from ..model.loader import TOKENIZER_FILES, load_tokenizer_from

    for folder in (adapter_dir, model_dir):
        if folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = load_tokenizer_from(folder, trust_remote_code)
            if tokenizer is not None:
                return tokenizer
    raise ModelLoadError(f"{model_dir} has no tokenizer files; copy the tokenizer next to config.json.")


def load_for_generation(
    model: str | Path,
    adapter: str | Path | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load what `chat` and `generate` talk to.

    With `adapter`, `model` is the base: it is quantized with the settings the adapter recorded (as in training)
    and the adapter is loaded on top. Without, `model` is a merged export or any plain model dir (or hub id),
    loaded in bf16 from safetensors. `revision` (branch, tag or commit) picks the snapshot of a hub-id `model`.
    """
    from ..model.loader import check_model_dir, default_device

    model_dir = check_model_dir(model, revision)
    device = torch.device(device) if device is not None else default_device()
    if adapter is not None:
        from ..export.adapter_load import load_base_with_adapter

        adapter_dir = Path(adapter)
        net, settings = load_base_with_adapter(model_dir, adapter_dir, device, trust_remote_code)
        description = f"{model_dir} ({settings.bits}-bit) + adapter {adapter_dir}"
    else:
        adapter_dir = None
        net = _load_plain(model_dir, device, trust_remote_code)
        description = str(model_dir)
    net.eval()
    return LoadedModel(net, _tokenizer_for(model_dir, adapter_dir, trust_remote_code), description)


def _load_plain(model_dir: Path, device: torch.device, trust_remote_code: bool) -> torch.nn.Module:
    """A merged or plain HF model dir, bf16, safetensors only."""
    from transformers import AutoModelForCausalLM

    from ..io.safetensors import weight_files

    weight_files(model_dir)  # refuses pickle-only checkpoints with our own message
    try:
        net = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{model_dir} could not be loaded as a causal LM ({first[:200]}).") from None
    return net.to(device)
