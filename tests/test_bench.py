"""tools/bench.py's pure parts (no timing): which baselines, the order of the sides, per-pair ratios, load warnings
and the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_tool

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench")


def test_baselines_are_parsed_lean_first_and_unknown_ones_refused(bench):
    assert bench.parse_baselines("lean,common") == ["lean", "common"]
    assert bench.parse_baselines(" common , lean ") == ["lean", "common"]
    assert bench.parse_baselines("common") == ["common"]
    for bad in ("", ",", "fast", "lean,baseline"):
        with pytest.raises(ValueError):
            bench.parse_baselines(bad)


def test_the_order_alternates_and_keeps_qlora_next_to_the_headline_baseline(bench):
    orders = [bench.side_order(["lean", "common"], False, r) for r in range(4)]
    assert orders == [["lean", "qlora", "common"], ["common", "qlora", "lean"]] * 2
    for compile_ in (False, True):
        for baselines in (["lean", "common"], ["lean"], ["common"]):
            for repeat in range(2):
                order = bench.side_order(baselines, compile_, repeat)
                assert sorted(order) == sorted([*baselines, "qlora", *(["qlora-compiled"] if compile_ else [])])
                assert abs(order.index("qlora") - order.index(baselines[0])) == 1
                if compile_:
                    assert abs(order.index("qlora") - order.index("qlora-compiled")) == 1


def fake_runs(tokens: dict[str, list[float]], rss: dict[str, list[float]] | None = None) -> list[dict]:
    runs = []
    for repeat in range(len(next(iter(tokens.values())))):
        for side, values in tokens.items():
            runs.append(
                {
                    "repeat": repeat,
                    "side": side,
                    "tokens_per_s": values[repeat],
                    "step_s": 256 / values[repeat],
                    "first_step_s": 20.0 if side == "qlora-compiled" else 1.0,
                    "losses": [10.0 + (0.001 if side == "common" else 0.0), 9.5],
                    "load_peak_rss": 2**30,
                    "train_peak_rss": (rss or {}).get(side, [2**30] * 9)[repeat],
                    "train_cpu_use": 1.9,
                    "threads": 2,
                    "process_cpu_s": 30.0,
                    "process_wall_s": 16.0,
                    "load_at_start": 0.1,
                }
            )
    return runs


SETTINGS = dict(device="cpu", model="llama-small", seq_len=256, micro_batch=1, steps=2, repeats=3, compile=False,
                baselines=["lean", "common"])  # fmt: skip


def test_ratios_are_per_pair_within_a_repeat_not_ratios_of_medians(bench):
    runs = fake_runs(
        {"lean": [100, 100, 400], "qlora": [100, 300, 200], "common": [50, 100, 100]},
        rss={"lean": [2.0, 2.0, 2.0], "qlora": [1.0, 1.5, 1.0], "common": [4.0, 4.0, 4.0]},
    )
    assert bench.pair_ratios(runs, "qlora", "lean", "tokens_per_s") == [1.0, 3.0, 0.5]
    load = bench.load_status((0.1, 0.2, 0.3), (1.9, 1.0, 0.5), 2, 2)
    report = bench.build_report(runs, SETTINGS, load, {"torch": "x"})
    lean = report["ratios"]["qlora/lean"]
    assert lean["tokens_per_s"] == {
        "median": 1.0,
        "min": 0.5,
        "max": 3.0,
        "values": [1.0, 3.0, 0.5],
        "repeats": [0, 1, 2],
    }
    assert report["medians"]["qlora"]["tokens_per_s"] / report["medians"]["lean"]["tokens_per_s"] == 2.0  # not it
    assert lean["train_peak_rss"]["median"] == 0.5
    common = report["ratios"]["qlora/common"]
    assert common["tokens_per_s"]["values"] == [2.0, 3.0, 2.0]
    assert common["first_step_loss_rel_diff"] == pytest.approx(0.001 / 10.001)
    assert list(report["ratios"]) == ["qlora/lean", "qlora/common"]  # lean, the headline, first
    assert report["order"] == [["lean", "qlora", "common"]] * 3  # as the fake runs were listed
    assert "compile" not in report
    assert json.loads(json.dumps(report)) == report  # one JSON line, as --json prints it
    text = "\n".join(bench.format_report(report))
    assert text.index("qlora-lite / lean") < text.index("qlora-lite / common")
    assert "1.000 [0.500-3.000]" in text and "WARNING" not in text


def test_a_missing_side_in_a_repeat_is_left_out_of_that_repeat(bench):
    runs = [r for r in fake_runs({"lean": [100, 100], "qlora": [150, 300]}) if (r["repeat"], r["side"]) != (1, "lean")]
    assert bench.pair_ratios(runs, "qlora", "lean", "tokens_per_s") == [1.5]


def test_load_warnings(bench):
    assert bench.load_status((0.9, 0, 0), (2.9, 0, 0), 2, 2)["warnings"] == []
    before = bench.load_status((1.1, 0, 0), (1.0, 0, 0), 2, 2)["warnings"]
    assert len(before) == 1 and "before" in before[0]
    after = bench.load_status((0.1, 0, 0), (3.2, 0, 0), 2, 2)["warnings"]
    assert len(after) == 1 and "after" in after[0]
    assert len(bench.load_status((3.0, 0, 0), (5.0, 0, 0), 2, 2)["warnings"]) == 2
    busy = bench.load_status((0.1, 0, 0), (1.0, 0, 0), 2, 2, busy=1.5)
    assert busy["busy_before"] == 1.5 and len(busy["warnings"]) == 1 and "busy" in busy["warnings"][0]
    assert bench.load_status((0.1, 0, 0), (1.0, 0, 0), 2, 2, busy=0.2)["warnings"] == []


def test_a_run_that_got_too_few_cores_is_named(bench):
    runs = fake_runs({"lean": [100, 100], "qlora": [150, 300]})
    runs[3]["train_cpu_use"] = 0.8  # repeat 2's qlora-lite: 0.8 of 2 cores
    assert len(bench.starved(runs, 2)) == 1 and "repeat 2 qlora-lite kept only 0.80 of 2" in bench.starved(runs, 2)[0]
    assert bench.starved(runs, 1) == []  # one core: 0.8 of it is enough
    report = bench.build_report(runs, SETTINGS, bench.load_status((0, 0, 0), (0, 0, 0), 2, 2), {})
    assert report["warnings"] == bench.starved(runs, 2)
    tokens = report["ratios"]["qlora/lean"]["tokens_per_s"]
    assert tokens["values"] == [1.5, 3.0] and tokens["suspect_repeats"] == [1]
    assert tokens["without_suspect"] == {"median": 1.5, "min": 1.5, "max": 1.5, "values": [1.5]}
    text = "\n".join(bench.format_report(report))
    assert "WARNING: repeat 2 qlora-lite" in text and "(1.500 3.000*); without *: 1.500 [1.500-1.500]" in text
    cuda = bench.build_report(runs, {**SETTINGS, "device": "cuda"}, bench.load_status((0, 0, 0), (0, 0, 0), 2, 2), {})
    assert cuda["warnings"] == [] and "suspect_repeats" not in cuda["ratios"]["qlora/lean"]["tokens_per_s"]


def test_the_compiled_side_gets_compiled_over_eager_and_its_payback(bench):
    runs = fake_runs({"lean": [100, 100], "qlora": [256, 256], "qlora-compiled": [512, 512]})
    settings = {**SETTINGS, "compile": True, "baselines": ["lean"]}
    report = bench.build_report(runs, settings, bench.load_status((0, 0, 0), (0, 0, 0), 2, 2), {})
    assert list(report["ratios"]) == ["qlora/lean", "qlora-compiled/qlora"]
    assert report["ratios"]["qlora-compiled/qlora"]["tokens_per_s"]["median"] == 2.0
    assert report["compile"] == {"compile_s": 19.0, "payback_steps": 38.0, "losses_equal_eager": True}
    assert "pays after ~38 steps" in "\n".join(bench.format_report(report))


def test_the_command_refuses_an_unknown_baseline_before_importing_torch():
    out = subprocess.run([sys.executable, str(TOOL), "--baselines", "fast"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--baselines" in out.stderr
