"""Outputs honour the user's umask, as `save_pretrained` and `open()` do (not mkstemp's owner-only 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from qlora_lite.io.atomic import atomic_dir, write_text_atomic


@pytest.mark.parametrize(
    "umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
)
def test_atomic_outputs_get_the_modes_the_umask_gives(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "out") as tmp:
            write_text_atomic(tmp / "inner.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "out" / "inner.json").stat().st_mode) == file_mode


def test_an_export_is_readable_by_others_under_the_usual_umask(tiny_model_dir, tmp_path):
    from qlora_lite import apply_lora, export_merged, load_quantized, save_adapter

    model_dir = tiny_model_dir("llama")
    model, _ = load_quantized(model_dir, device="cpu", load_tokenizer=False)
    apply_lora(model, r=4, alpha=8, seed=0)
    old = os.umask(0o022)
    try:
        adapter = save_adapter(model, tmp_path / "adapter")
        merged = export_merged(model_dir, adapter, tmp_path / "merged")
    finally:
        os.umask(old)
    for path in [adapter, merged, *adapter.iterdir(), *merged.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, (path, oct(mode))  # group and others can read what a server loads
