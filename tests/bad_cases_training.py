"""Bad-input cases for training runs: data, resume, run directories, signals; appended to `tests/test_bad_input.py`'s table (see bad_input_support)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from qlora_lite.cli import main
from qlora_lite.io.atomic import file_sha256

from .bad_input_support import Case, Workspace


def _trained(ws: Workspace, **changes) -> Path:
    """One real 2-step run (a checkpoint at step 2) in ./run; returns the checkpoint."""
    assert main(ws.train(train__max_steps=2, **changes)) == 0
    ws.changed.clear()  # the table shows the resumed command's changes only
    return ws.root / "run" / "checkpoints" / "step-2"


def _rewrite(checkpoint: Path, name: str, content: bytes) -> None:
    """Replace a checkpoint file and record it in the COMPLETE marker, as someone who meant it would."""
    (checkpoint / name).write_bytes(content)
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["checksums"][name] = {"bytes": len(content), "sha256": file_sha256(checkpoint / name)}
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


class _Payload:
    """What a hostile optimizer.pt would carry: unpickling it calls a function of the attacker's choice."""

    def __reduce__(self):
        return (print, ("this must never run",))


def _changed_data(ws: Workspace) -> list[str]:
    _trained(ws)
    ws.write("train.jsonl", ws.data.read_text() + '{"text": "added after the checkpoint"}\n')
    return ws.train("--resume", train__max_steps=4)


def _max_steps_below_checkpoint(ws: Workspace) -> list[str]:
    _trained(ws)
    return ws.train("--resume", train__max_steps=1)


def _pickled_optimizer(ws: Workspace) -> list[str]:
    checkpoint = _trained(ws)
    _rewrite(checkpoint, "optimizer.pt", pickle.dumps({"masters": [_Payload()]}))
    return ws.train("--resume", train__max_steps=4)


def _foreign_optimizer(ws: Workspace) -> list[str]:
    import io

    import torch

    checkpoint = _trained(ws)
    buffer = io.BytesIO()
    torch.save({"state": {0: torch.zeros(2)}, "param_groups": []}, buffer)  # tensors only, but not our format
    _rewrite(checkpoint, "optimizer.pt", buffer.getvalue())
    return ws.train("--resume", train__max_steps=4)


def _broken_trainer_state(ws: Workspace) -> list[str]:
    checkpoint = _trained(ws)
    _rewrite(checkpoint, "trainer_state.json", b'{"step": "two"}')
    return ws.train("--resume", train__max_steps=4)


CASES: list[Case] = [
    Case(
        "data-lone-surrogate",
        "a JSONL line with a lone UTF-16 surrogate escape (valid JSON, not text)",
        lambda ws: ws.train(data__train=str(ws.jsonl("surrogate.jsonl", {"text": "ok"}, '{"text": "a\\ud800b"}'))),
        "./surrogate.jsonl line 2 holds the escape \\ud800, half of a UTF-16 surrogate pair, which is no character "
        "on its own; write the character itself or its full pair, or remove that record.",
    ),
    Case(
        "data-deep-nesting",
        "a JSONL line nested 100000 levels deep",
        lambda ws: ws.train(data__train=str(ws.jsonl("deep.jsonl", {"text": "ok"}, "[" * 100000 + "]" * 100000))),
        "./deep.jsonl line 2 nests JSON arrays or objects too deeply to read",
    ),
    Case(
        "data-huge-number",
        "a JSONL line with an integer of 5000 digits",
        lambda ws: ws.train(data__train=str(ws.jsonl("number.jsonl", '{"text": "ok", "id": ' + "9" * 5000 + "}"))),
        "./number.jsonl line 1 cannot be read as JSON (Exceeds the limit (4300 digits) for integer string conversion)",
    ),
    Case(
        "train-resume-changed-data",
        "--resume after the training data file changed",
        _changed_data,
        "data.train file ./train.jsonl changed since checkpoint ./run/checkpoints/step-2 was written (",
    ),
    Case(
        "train-output-dir-under-a-file",
        "an output_dir inside what is a file",
        lambda ws: ws.train(output_dir=str(ws.data / "run")),
        "output_dir ./train.jsonl/run cannot be made: ./train.jsonl is a file; choose another output_dir.",
    ),
    Case(
        "train-allow-data-change-without-resume",
        "--allow-data-change without --resume",
        lambda ws: ws.train("--allow-data-change"),
        "--allow-data-change (allow_data_change=True) only applies when resuming; add --resume or drop it.",
    ),
    Case(
        "train-resume-max-steps-below-checkpoint",
        "--resume with a max_steps below the checkpoint's step",
        _max_steps_below_checkpoint,
        "train.max_steps is 1 but checkpoint ./run/checkpoints/step-2 is at step 2; set train.max_steps to 2 or more",
    ),
    Case(
        "train-resume-pickled-optimizer",
        "a checkpoint whose optimizer.pt is a pickle of arbitrary objects (its COMPLETE marker updated to match)",
        _pickled_optimizer,
        "./run/checkpoints/step-2/optimizer.pt holds objects other than tensors; qlora-lite never unpickles them; "
        "delete this checkpoint to resume from an older one.",
    ),
    Case(
        "train-resume-foreign-optimizer",
        "a checkpoint whose optimizer.pt holds tensors in another layout (its COMPLETE marker updated to match)",
        _foreign_optimizer,
        "./run/checkpoints/step-2/optimizer.pt does not hold an optimizer state written by qlora-lite; "
        "delete this checkpoint to resume from an older one.",
    ),
    Case(
        "train-resume-broken-trainer-state",
        "a checkpoint whose trainer_state.json lacks the step (its COMPLETE marker updated to match)",
        _broken_trainer_state,
        "checkpoint ./run/checkpoints/step-2 has a trainer_state.json without the step, data position or logging "
        "window; delete this checkpoint to resume from an older one.",
    ),
    Case(
        "train-chat-template-unknown-name",
        "a data.chat_template that is neither a known template name nor a file",
        lambda ws: ws.train(data__chat_template="chatlm"),
        "data.chat_template is 'chatlm', which is neither a known template (did you mean 'chatml'?) nor an existing "
        "file; use chatml, fallback or llama3, or the path of a Jinja file.",
    ),
    Case(
        "train-chat-template-does-not-render",
        "a data.chat_template Jinja file with a syntax error",
        lambda ws: ws.train(data__chat_template=str(ws.write("chat.jinja", "{% for m in messages %}{{ m.content }}"))),
        "data.chat_template ./chat.jinja cannot render a conversation (Unexpected end of template); fix the template "
        "or use chatml, fallback or llama3.",
    ),
    Case(
        "train-add-special-token-already-in-vocabulary",
        "a data.add_special_tokens entry the tokenizer already has",
        lambda ws: ws.train(data__add_special_tokens=["<|im_start|>", "</s>"], data__resize_embeddings=True),
        "data.add_special_tokens: '</s>' is already in the tokenizer's vocabulary (id 2); remove it from the list.",
    ),
    Case(
        "data-columns-missing",
        "a data source whose columns mapping names a field a record lacks",
        lambda ws: ws.train(
            data__train=[
                {
                    "path": str(ws.jsonl("qa.jsonl", {"question": "2+2=", "answer": "4"}, {"question": "3+3="})),
                    "columns": {"question": "prompt", "answer": "completion"},
                }
            ]
        ),  # fmt: skip
        "data.train[0].columns maps 'answer', but ./qa.jsonl line 2 has no field 'answer' (it has: question); "
        "fix data.train[0].columns or the record.",
    ),
    Case(
        "data-source-weight-not-positive",
        "a data source with weight 0",
        lambda ws: ws.train(data__train=[str(ws.data), {"path": str(ws.data), "weight": 0}]),
        "data.train[1].weight is 0; a weight is a number > 0 (the source's share of the mix).",
    ),
    Case(
        "data-source-unknown-format",
        "a data source naming an unknown format",
        lambda ws: ws.train(data__train=[{"path": str(ws.data), "format": "sharegtp"}]),
        "data.train[0].format is 'sharegtp' (did you mean 'sharegpt'?); use one of auto, text, prompt_completion, "
        "messages, alpaca, sharegpt.",
    ),
    Case(
        "data-source-unknown-key",
        "a data source with an unknown key",
        lambda ws: ws.train(data__train=[{"path": str(ws.data), "weigth": 0.5}]),
        "data.train[0] has the unknown key 'weigth' (did you mean 'weight'?); a source's keys are path, weight, "
        "format, columns.",
    ),
]
