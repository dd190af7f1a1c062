"""`qlora-lite chat` and `generate` on the demo's trained adapter and its merged export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qlora_lite.cli import main
from qlora_lite.demo.task import SAMPLE_WORDS, shift_word


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base dir, adapter dir, merged dir) of a demo run: the adapter teaches the shift task."""
    from qlora_lite.demo.run import run_demo

    demo = run_demo(tmp_path_factory.mktemp("demo") / "demo", train_steps=80)
    assert demo.merged_dir is not None, demo.merge_note
    return demo.base_dir, demo.run_dir / "adapter", demo.merged_dir


def cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qlora_lite", *argv], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


GREEDY = ("--greedy", "--max-new-tokens", "8")


def test_generate_answers_the_same_through_adapter_and_merged_export(trained, tmp_path, capsys):
    base, adapter, merged = trained
    prompts = [arg for w in SAMPLE_WORDS for arg in ("--prompt", f"shift {w} =")]
    assert main(["generate", "--model", str(base), "--adapter", str(adapter), *prompts, *GREEDY]) == 0
    through_adapter = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    out = tmp_path / "answers.jsonl"
    done = cli("generate", "--model", str(merged), *prompts, *GREEDY, "--output", str(out))
    assert done.returncode == 0, done.stderr
    through_merged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tokens"] for r in through_adapter] == [r["tokens"] for r in through_merged]
    assert [r["completion"] for r in through_merged] == [f" {shift_word(w)}" for w in SAMPLE_WORDS]


def test_generate_reads_prompts_from_jsonl(trained, tmp_path, capsys):
    _, _, merged = trained
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "shift quant ="}\n{"prompt": "shift zebra =", "completion": "ignored"}\n')
    assert main(["generate", "--model", str(merged), "--input", str(data), *GREEDY]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in rows] == [" rvbou", " afcsb"]


def test_chat_streams_answers_and_resets(trained):
    base, adapter, merged = trained
    script = "shift hello =\nshift hello =\n/reset\nshift hello =\n/exit\nshift never =\n"
    by_adapter = cli("chat", "--model", str(base), "--adapter", str(adapter), *GREEDY, stdin=script)
    assert by_adapter.returncode == 0, by_adapter.stderr
    answers = by_adapter.stdout.splitlines()
    assert len(answers) == 3  # /exit stopped before the last line
    assert answers[0] == answers[2]  # after /reset the conversation starts over: the same first answer
    assert "(conversation reset)" in by_adapter.stderr and "Traceback" not in by_adapter.stderr
    by_merged = cli("chat", "--model", str(merged), *GREEDY, stdin=script)
    assert by_merged.returncode == 0, by_merged.stderr
    assert by_merged.stdout == by_adapter.stdout  # same greedy tokens through the merged export


@pytest.mark.parametrize(
    "extra,message",
    [(("--temperature", "-1"), "--temperature is -1.0"), (("--top-p", "0"), "--top-p is 0.0"),
     (("--max-new-tokens", "0"), "--max-new-tokens is 0")],
)  # fmt: skip
def test_bad_sampling_settings_are_one_line(trained, capsys, extra, message):
    _, _, merged = trained
    assert main(["generate", "--model", str(merged), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
