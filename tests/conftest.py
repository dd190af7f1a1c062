"""Shared fixtures: tiny random models saved as safetensors (built once per session), offline tokenizer."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore", module="bitsandbytes")
torch.set_num_threads(2)

from transformers.utils import logging as hf_logging  # noqa: E402

from qlora_lite.model.tiny import save_tiny_model  # noqa: E402

# transformers' "Writing model shards" bar would land in the stderr that CLI tests read as the error output
hf_logging.disable_progress_bar()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(arch, **config_overrides) -> Path, cached per argument set."""
    cache: dict = {}

    def make(arch: str = "llama", **kwargs):
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = save_tiny_model(path, arch, **kwargs)
        return cache[key]

    return make
