"""Chat templates that travel with the model: `data.chat_template`, `data.system_prompt`, the fallback notice, and
the template saved with the adapter and the merged export (so chat/generate/`apply_chat_template` render as training
did)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import yaml

from qlora_lite.cli import main
from qlora_lite.config.settings import DataConfig
from qlora_lite.data.batching import IGNORE_INDEX
from qlora_lite.data.chat import (
    CHATML_CHAT_TEMPLATE,
    FALLBACK_CHAT_TEMPLATE,
    LLAMA3_CHAT_TEMPLATE,
    check_chat_template,
    read_chat_template,
    render_chat,
    with_default_system,
)
from qlora_lite.data.encode import build_dataset
from qlora_lite.errors import ConfigError, DataError
from qlora_lite.model.tiny import CHAT_TEMPLATE, make_tokenizer
from qlora_lite.training.setup import FALLBACK_NOTICE, choose_chat_template, finish_chat_template

CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
RECORDS = [
    {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w}!"}]}
    for w in ("alpha", "beta", "gamma", "delta")
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def bare_model(tiny_model_dir, tmp_path_factory):
    """The tiny llama with a tokenizer that has no chat template."""
    dst = tmp_path_factory.mktemp("bare") / "model"
    shutil.copytree(tiny_model_dir("llama"), dst)
    (dst / "chat_template.jinja").unlink()
    assert "chat_template" not in json.loads((dst / "tokenizer_config.json").read_text())
    return dst


def _train(root, model, **data) -> tuple[int, str, str]:
    """A 2-step CLI run on messages records in root/run; (exit code, stdout, stderr)."""
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config = {
        "model": str(model),
        "output_dir": str(root / "run"),
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(root / "train.jsonl"), "max_seq_len": 192, **data},
        "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "optimizer": "adamw", "eval_every": 0},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(root / "run.yaml")])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fallback_run(bare_model, tmp_path_factory):
    """A run on messages records with a template-less tokenizer, and its merged export: (root, stdout)."""
    root = tmp_path_factory.mktemp("fallback-run")
    code, out, err = _train(root, bare_model)
    assert code == 0, err
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        done = main(["export", "--base", str(bare_model), "--adapter", str(root / "run" / "adapter"),
                     "--out", str(root / "merged")])  # fmt: skip
    assert done == 0
    return root, out


def test_fallback_template_is_said_at_start(fallback_run):
    _, out = fallback_run
    assert " ".join(FALLBACK_NOTICE.split()) in " ".join(out.split())  # rich may wrap the line


def test_adapter_dir_carries_the_template_used(fallback_run, bare_model):
    from qlora_lite.generate.load import load_for_generation

    adapter = fallback_run[0] / "run" / "adapter"
    assert (adapter / "chat_template.jinja").read_text() == FALLBACK_CHAT_TEMPLATE
    assert (adapter / "adapter_config.json").is_file()
    loaded = load_for_generation(bare_model, adapter, device="cpu")  # chat and generate take the adapter's tokenizer
    assert loaded.tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE


def test_merged_export_renders_as_training_did(fallback_run, bare_model):
    from transformers import AutoTokenizer

    training = AutoTokenizer.from_pretrained(bare_model)
    assert not training.chat_template  # training rendered through the fallback
    merged = AutoTokenizer.from_pretrained(fallback_run[0] / "merged")
    for prompt, conversation in ((False, CONVERSATION), (True, CONVERSATION[:1])):
        expected = render_chat(training, conversation, add_generation_prompt=prompt)
        got = merged.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
        assert got == expected
        assert merged(got, add_special_tokens=False).input_ids == training(expected, add_special_tokens=False).input_ids
    assert (fallback_run[0] / "merged" / "generation_config.json").is_file()  # still the base's


def test_export_takes_the_base_tokenizer_when_the_adapter_has_none(fallback_run, tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(fallback_run[0] / "run" / "adapter", adapter)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (adapter / name).unlink()
    base = tiny_model_dir("llama")  # its tokenizer has the tiny template
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()


def test_chatml_and_system_prompt_travel_with_the_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    code, out, err = _train(tmp_path, tiny_model_dir("llama"), chat_template="chatml", system_prompt="Be brief.")
    assert code == 0, err
    assert "fallback" not in out
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    # a conversation without a system turn gets the one training put first
    assert saved.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )
    own = [{"role": "system", "content": "Be long."}, *CONVERSATION[:1]]
    assert saved.apply_chat_template(own, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe long.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------------------ choosing a template
def test_chatml_renders_im_start_turns_and_trains_on_the_answer():
    tok = make_tokenizer(chat_template=False)
    choose_chat_template(DataConfig(chat_template="chatml"), tok)
    assert tok.chat_template == CHATML_CHAT_TEMPLATE
    assert render_chat(tok, CONVERSATION) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )
    assert render_chat(tok, CONVERSATION[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    ex = build_dataset([("r", {"messages": CONVERSATION})], tok, 128).examples[0]
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "It is 4.<|im_end|>\n"


def test_llama3_template_by_name(tok):
    assert read_chat_template("llama3") == LLAMA3_CHAT_TEMPLATE
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, chat_template=LLAMA3_CHAT_TEMPLATE)
    assert text == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 4.<|eot_id|>"
    )


def test_a_jinja_file_is_read(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tokenizer = make_tokenizer()
    choose_chat_template(DataConfig(chat_template=str(path)), tokenizer)
    assert render_chat(tokenizer, CONVERSATION) == "[user] What is 2+2?\n[assistant] It is 4.\n"


def test_empty_setting_keeps_the_tokenizers_own_template():
    tokenizer = make_tokenizer()
    choose_chat_template(DataConfig(), tokenizer)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert finish_chat_template(DataConfig(), tokenizer, uses_messages=True) == []
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_fallback_is_set_and_said_only_when_messages_used_it():
    tokenizer = make_tokenizer(chat_template=False)
    assert finish_chat_template(DataConfig(), tokenizer, uses_messages=False) == []
    assert not tokenizer.chat_template  # a text-only run used no template
    assert finish_chat_template(DataConfig(), tokenizer, uses_messages=True) == [FALLBACK_NOTICE]
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE


@pytest.mark.parametrize(
    "setting,message",
    [
        ("chatlm", "data.chat_template is 'chatlm', which is neither a known template (did you mean 'chatml'?) nor an "
                   "existing file; use chatml, fallback or llama3, or the path of a Jinja file."),
        ("./nope.jinja", "data.chat_template file ./nope.jinja does not exist; give an existing Jinja file or one of "
                         "chatml, fallback or llama3."),
    ],
)  # fmt: skip
def test_unknown_name_or_missing_file_names_the_setting(setting, message):
    with pytest.raises(ConfigError) as err:
        read_chat_template(setting)
    assert str(err.value) == message


def test_a_directory_or_empty_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        read_chat_template(str(tmp_path))
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_chat_template(str(tmp_path / "empty.jinja"))


@pytest.mark.parametrize(
    "template,fragment",
    [
        ("{% for m in messages %}{{ m['content'] }}", "cannot render a conversation (Unexpected end of template); fix"),
        ("{{ raise_exception('roles must alternate') }}", "cannot render a conversation (roles must alternate)"),
        ("{% for m in messages %}{{ m['role'] }}{% endfor %}", "renders a conversation without its messages' text"),
    ],
)
def test_a_template_that_does_not_render_is_one_sentence(tok, template, fragment):
    with pytest.raises(ConfigError) as err:
        check_chat_template(tok, template, "data.chat_template t.jinja")
    text = str(err.value)
    assert text.startswith("data.chat_template t.jinja ") and fragment in text and "\n" not in text


# -------------------------------------------------------------------------------------------- system prompt
def test_system_prompt_opens_conversations_without_one_and_carries_no_loss(tok):
    records = [
        ("a", {"messages": CONVERSATION}),
        ("b", {"messages": [{"role": "system", "content": "Own."}, *CONVERSATION]}),
    ]
    a, b = build_dataset(records, tok, 256, system_prompt="Be brief.").examples
    system_turn = render_chat(tok, [{"role": "system", "content": "Be brief."}])
    ids = tok(system_turn, add_special_tokens=False).input_ids
    assert a.input_ids[: len(ids)] == ids  # the system turn comes first
    assert all(lab == IGNORE_INDEX for lab in a.labels[: len(ids)])  # and no loss is taken on it
    assert tok.decode([t for t, lab in zip(a.input_ids, a.labels) if lab != IGNORE_INDEX]) == "It is 4.</s>"
    text = tok.decode(b.input_ids)
    assert text.count("<|system|>") == 1 and "Own." in text and "Be brief." not in text  # its own system turn kept
    plain = build_dataset([("a", {"messages": CONVERSATION})], tok, 256).examples[0]
    assert "<|system|>" not in tok.decode(plain.input_ids)  # empty: no system turn


@pytest.mark.parametrize(
    "template", [CHAT_TEMPLATE, FALLBACK_CHAT_TEMPLATE, CHATML_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE]
)
def test_default_system_in_the_template_renders_as_training_did(tok, template):
    prompt = 'Say "hi" \\ it\'s\nnew 😀 é {{ x }} {% endraw %}'  # quotes, escapes, Jinja syntax: all literal
    wrapped = with_default_system(template, prompt)
    own = [{"role": "system", "content": "Own."}, *CONVERSATION]
    for gen in (False, True):

        def render(t: str, m: list[dict], gen: bool = gen) -> str:
            return tok.apply_chat_template(m, tokenize=False, chat_template=t, add_generation_prompt=gen)

        assert render(wrapped, CONVERSATION) == render(template, [{"role": "system", "content": prompt}, *CONVERSATION])
        assert render(wrapped, own) == render(template, own)


def test_a_template_that_refuses_the_system_turn_fails_on_the_data(tok):
    refusing = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    tokenizer = make_tokenizer()
    tokenizer.chat_template = refusing
    with pytest.raises(DataError, match=r"r: the chat template cannot render this conversation \(no system role\)"):
        build_dataset([("r", {"messages": CONVERSATION})], tokenizer, 128, system_prompt="Be brief.")


def test_added_chatml_tokens_replace_the_fallback_with_real_special_tokens():
    """A tokenizer without a template, with <|im_start|> / <|im_end|> added: ChatML with each marker one token."""
    from qlora_lite.model.embeddings import add_special_tokens
    from qlora_lite.training.setup import CHATML_NOTICE

    def prepared(tokens):
        tok = make_tokenizer(chat_template=False)
        ids = add_special_tokens(tok, tokens)
        notices = choose_chat_template(DataConfig(add_special_tokens=tokens, resize_embeddings=True), tok)
        return tok, ids, notices

    tok, (start, end), notices = prepared(["<|im_start|>", "<|im_end|>"])
    assert notices == [CHATML_NOTICE] and tok.chat_template == CHATML_CHAT_TEMPLATE
    example = build_dataset([("messages", RECORDS[0])], tok, 192).examples[0]
    assert example.input_ids.count(start) == len(RECORDS[0]["messages"])  # one token per turn marker
    answer_end = [i for i, t in enumerate(example.input_ids) if t == end][-1]
    assert example.labels[answer_end] == end  # the assistant's <|im_end|> is trained: it ends the turn
    tok, _, notices = prepared(["<|im_start|>"])  # not both markers: nothing chosen here, the fallback follows
    assert notices == [] and not getattr(tok, "chat_template", None)
