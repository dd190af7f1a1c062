"""tools/gpu_suite.py on the CPU: the smoke run writes both reports with a status for every section and real figures
for what the CPU can run; a section that raises or hangs is recorded as failed and the sections after it still run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_tool

TOOL = Path(__file__).resolve().parent.parent / "tools" / "gpu_suite.py"
SECTIONS = ["environment", "correctness", "training", "speed", "memory_report", "oom", "longest_context"]


@pytest.fixture(scope="module")
def suite():
    return load_tool("gpu_suite")


def test_the_longest_context_search_brackets_the_true_limit_from_either_side(suite):
    warm = {"seq_len": 32, "seconds": 0.01, "fits": True}
    for predicted in (900, 3000, 100):  # close, far above, far below the true limit of 1000 tokens
        lo, hi, tries = suite.search_longest(
            lambda n: {"seq_len": n, "fits": n <= 1000, "seconds": 0.01}, warm, predicted, 4096, 16, lambda: 1e9, print
        )
        assert lo <= 1000 < hi and hi - lo <= 32, (predicted, lo, hi, tries)
        assert tries[0]["seq_len"] == suite.snapper(16, 4096)(predicted) and len(tries) <= 14
    lo, hi, tries = suite.search_longest(lambda n: {"seq_len": n, "fits": True, "seconds": 0.01}, warm, 2000, 4096, 16,
                                         lambda: 1e9, print)  # fmt: skip
    assert (lo, hi) == (4096, None)
    notes = []
    lo, hi, tries = suite.search_longest(lambda n: 1 / 0, warm, 2000, 4096, 16, lambda: 1.0, notes.append)
    assert (lo, hi, tries) == (32, None, []) and "time box" in notes[0]


def test_advice_flags_grid_and_peak_table(suite):
    advice = suite.parse_advice(
        "error: training ran out of GPU memory (...)\nmemory: predicted peak 30.71 GiB ...\n"
        "fix: gradient checkpointing on: predicted 5.49 GiB, fits\n"
        "run: the same command with --resume --train.gradient_checkpointing true\n"
    )
    assert advice["flags"] == [("train.gradient_checkpointing", "true")] and advice["resume"] is True
    advice = suite.parse_advice(
        "run: the same command with --train.micro_batch_size 1 --train.grad_accum 2 and a new output_dir"
    )
    assert advice["flags"] == [("train.micro_batch_size", "1"), ("train.grad_accum", "2")] and advice["resume"] is False
    points = suite.grid_points((512, 2048), (1, 4))
    assert len(set(points)) == 16
    half = points[:8]
    for i, levels in enumerate(((4, 8), (512, 2048), (1, 4), (True, False))):
        assert all(sum(p[i] == level for p in half) == 4 for level in levels)  # each setting 4 times
    assert suite.peak_bf16_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert suite.peak_bf16_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert suite.peak_bf16_tflops("NVIDIA H200")[0] == 989.0
    assert suite.peak_bf16_tflops("Tesla T4") == (None, None)


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("GPU_SUITE_FAIL_SECTION", None)
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--smoke", "--out", str(out), "--work", str(tmp_path / "work"),
         *extra],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    report = json.loads((out / "gpu-report.json").read_text())
    markdown = (out / "gpu-report.md").read_text()
    assert (out / "gpu-suite.log").is_file()
    return proc, report, markdown


def _sections(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["sections"]}


def _check(section: dict, start: str) -> dict:
    return next(c for c in section["checks"] if c["name"].startswith(start))


def _every_status_explained(report: dict, markdown: str) -> None:
    for s in report["sections"]:
        assert s["status"] in ("ok", "skipped", "failed"), s
        assert s["status"] != "skipped" or s["reason"], s
        assert s["status"] != "failed" or s["error"], s
        assert f"## {s['name']}: " in markdown and f"| {s['name']} | {s['status']} |" in markdown
        for c in s.get("checks", []):
            assert c["status"] in ("ok", "skipped", "failed"), c
            assert c["status"] != "skipped" or c["reason"], c
            assert c["status"] != "failed" or c["error"], c


@pytest.mark.slow
def test_cpu_smoke_run_reports_every_section_with_real_figures(tmp_path):
    proc, report, markdown = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = _sections(report)
    assert list(sections) == SECTIONS
    _every_status_explained(report, markdown)
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(SECTIONS, "ok"), proc.stdout[-3000:]
    assert report["finished"] and report["device"] == "cpu" and report["smoke"] is True

    # what needs CUDA is recorded as skipped, with the reason
    assert _check(sections["environment"], "GPU")["status"] == "skipped"
    for start in ("4-bit nf4", "8-bit LLM.int8"):
        check = _check(sections["correctness"], start)
        assert check["status"] == "skipped" and "no CUDA" in check["reason"]
    assert _check(sections["speed"], "MFU")["status"] == "skipped"

    # the rest measured something sane
    for bits in (4, 8):
        f = _check(sections["correctness"], f"logits: load_quantized vs transformers BitsAndBytesConfig, {bits}-bit")[
            "figures"
        ]
        assert f["logits_rel_diff"] < 1e-3 and f["stored_bytes"] > 0
        f = _check(sections["correctness"], "LoRA layer")["figures"]
        assert all(0 < f[k] < 2e-2 for k in f if k.startswith("rel_err_"))

    train = _check(sections["training"], "qlora_lite.train")["figures"]
    assert train["last_loss"] < train["first_loss"] and train["steps"] == 6
    resume = _check(sections["training"], "SIGKILL")["figures"]
    assert resume["killed"] == "killed by SIGKILL" and resume["resumed_from"] == 3
    assert resume["max_abs_diff"] == 0 and resume["bitwise"] is True and resume["logged_loss_max_abs_diff"] == 0

    speed = _check(sections["speed"], "tokens/s")["figures"]
    assert [r["side"] for r in speed["runs"]] == ["lean", "qlora", "common"]  # both of tools/bench.py's baselines
    assert all(speed[f"tokens_per_s_{side}"] > 0 for side in ("qlora", "lean", "common"))
    assert speed["peak_ratio_lean"] > 0 and speed["peak_ratio_common"] > 0
    chunk = _check(sections["speed"], "loss chunk of 512")
    assert chunk["status"] == "ok" and chunk["figures"]["tokens_per_s_chunk512"] > 0, chunk

    points = _check(sections["memory_report"], "predicted vs measured")["figures"]["points"]
    assert len(points) >= 8
    for p in points:
        assert p["predicted"] > 0 and p["measured"] > 0 and math.isfinite(p["error"]) and p["exact_components"], p
    assert {(p["bits"], p["checkpointing"]) for p in points} == {(4, True), (4, False), (8, True), (8, False)}

    squeezed = _check(sections["oom"], "squeezed run")["figures"]
    assert squeezed["exit_code"] == 3 and squeezed["advised_flags"]
    assert any(line.startswith("fix: ") for line in squeezed["advice_lines"])
    assert _check(sections["oom"], "the advised setting")["figures"]["exit_code"] == 0

    longest = _check(sections["longest_context"], "longest sequence")["figures"]
    assert longest["measured_longest"] > 0 and longest["shortest_failing"] > longest["measured_longest"]
    assert sections["longest_context"]["figures"]["predicted_longest"] > 0
    assert report["totals"]["ok"] == len(SECTIONS) and report["totals"]["targets_met"] > 0


@pytest.mark.slow
def test_a_section_that_raises_or_hangs_is_recorded_and_the_later_ones_still_run(tmp_path):
    proc, report, markdown = _run(
        tmp_path,
        "--sections", "environment,correctness,memory_report",
        "--fail-section", "environment:hang", "--time-box", "environment=3",
        "--fail-section", "correctness",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = _sections(report)
    assert list(sections) == ["environment", "correctness", "memory_report"]
    _every_status_explained(report, markdown)
    assert sections["environment"]["status"] == "failed"
    assert sections["environment"]["error"].startswith("timed out after 3 s")
    assert sections["correctness"]["status"] == "failed"
    assert "forced failure (--fail-section)" in sections["correctness"]["error"]
    assert sections["memory_report"]["status"] == "ok"
    assert len(_check(sections["memory_report"], "predicted vs measured")["figures"]["points"]) >= 8
    assert report["finished"] and report["totals"]["failed"] == 2 and report["totals"]["ok"] == 1


def test_speed_ratios_are_per_repeat_pairs_against_each_baseline(suite):
    def run(side, repeat, tps, mem):
        return {"side": side, "repeat": repeat, "tokens_per_s": tps, "train_peak_rss": mem, "losses": [2.0, 1.0]}

    runs = [run("lean", 0, 100, 10), run("qlora", 0, 150, 6), run("common", 0, 90, 12),
            run("common", 1, 45, 12), run("qlora", 1, 50, 6), run("lean", 1, 40, 10)]  # fmt: skip
    f = suite.speed_figures(runs, ("lean", "common"), "train_peak_rss", cuda=False)
    # per repeat: 150/100 and 50/40, not the ratio of the medians (100/70)
    assert f["tokens_per_s_ratio_lean"] == pytest.approx((1.5 + 1.25) / 2)
    assert f["tokens_per_s_ratio_common"] == pytest.approx((150 / 90 + 50 / 45) / 2)
    assert f["tokens_per_s_qlora"] == 100 and f["peak_ratio_lean"] == pytest.approx(0.6)
    assert f["first_step_loss_rel_diff"] == 0
