"""GGUF export: tensors read back with gguf's reader against the merged safetensors export (names, shapes, types,
values: F16 equal after undoing the q/k permutation, Q8_0/Q4_0 within their quantization error), llama.cpp's
metadata keys, the tokenizer arrays and chat template, the Ollama Modelfile (template translation), refusals
before any file exists, bounded memory measured from outside, and (when a llama.cpp binding is importable)
greedy tokens of llama.cpp against transformers on the merged export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qlora_lite import apply_lora, load_quantized, save_adapter
from qlora_lite.cli import main
from qlora_lite.data.chat import CHATML_CHAT_TEMPLATE, FALLBACK_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE, with_default_system
from qlora_lite.errors import ExportError
from qlora_lite.export.hf_dir import export_merged
from qlora_lite.model.lora import lora_layers
from qlora_lite.model.tiny import make_tokenizer
from tests.helpers import load_tool

gguf = pytest.importorskip("gguf")
from qlora_lite.export.gguf import run_gguf_export  # noqa: E402
from qlora_lite.export.modelfile import PLAIN_TEMPLATE, go_template, infer_chat_format  # noqa: E402

ARCHS = {  # tiny-model overrides: Gemma 2 as llama.cpp runs it (tied head, query scale 1/sqrt(head_dim))
    "llama": {},
    "qwen2": {},
    "gemma": {},
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, tie_word_embeddings=True),
    "llama-tied": dict(tie_word_embeddings=True),
    "mistral": {},  # llama.cpp runs Mistral as Llama
}
LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
GEMMA2_LAYER = {
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}  # fmt: skip
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llama_cpp_name(key: str, arch: str) -> str:
    """llama.cpp's name for a Hugging Face checkpoint key, written out by hand (not from gguf's tables)."""
    module, _, kind = key.rpartition(".")
    if module in TOP:
        return f"{TOP[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)
    table = {**LAYER, **GEMMA2_LAYER} if arch == "gemma2" else LAYER
    return f"blk.{layer}.{table[rest]}.{kind}"


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's interleaved rotary rows back to Hugging Face's half-split layout (inverse of the export's)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Factory: (base_dir, adapter_dir) of a tiny model of `arch` with a random non-zero 4-bit LoRA adapter."""
    from qlora_lite.model.tiny import save_tiny_model

    cache: dict = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"gguf-{arch}")
            base = save_tiny_model(root / "base", arch.split("-")[0], **ARCHS[arch])
            model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
            apply_lora(model, r=8, alpha=16, seed=0)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for layer in lora_layers(model).values():
                    layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
            cache[arch] = (base, save_adapter(model, root / "adapter"))
        return cache[arch]

    return make


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """Factory: (merged safetensors tensors, GGUFReader, result) for an arch and GGUF type, cached."""
    cache: dict = {}

    def make(arch: str, gguf_type: str):
        key = (arch, gguf_type)
        if key not in cache:
            base, adapter = trained(arch)
            root = tmp_path_factory.mktemp(f"out-{arch}-{gguf_type}")
            dtype = "bfloat16" if gguf_type == "bf16" else "float16"
            merged = export_merged(base, adapter, root / "merged", dtype=dtype, device="cpu")
            tensors = {k: v for p in sorted(merged.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
            result = run_gguf_export(base, adapter, root / "gguf", gguf_type, device="cpu")
            cache[key] = (tensors, gguf.GGUFReader(result.path), result)
        return cache[key]

    return make


def field(reader, key: str):
    return reader.fields[key].contents()


def read_config(base: Path) -> dict:
    return json.loads((base / "config.json").read_text())


def checkpoint(base: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(base.glob("*.safetensors")) for k, v in load_file(str(p)).items()}


def gguf_values(tensor) -> torch.Tensor:
    """A reader tensor's values in numpy order ([rows, cols]) as fp32, dequantized where quantized."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(tuple(reversed(tensor.shape.tolist())))


def expected(arch: str, key: str, merged: dict, original: dict, config: dict) -> torch.Tensor:
    """The GGUF tensor for `key` in Hugging Face's layout: the export's 2-D tensors, the checkpoint's 1-D ones (+1
    for Gemma's norms, which it stores as w - 1)."""
    if merged[key].dim() == 1:
        value = original[key].float()
        return value + 1 if arch.startswith("gemma") and key.endswith("norm.weight") else value
    return merged[key].float()


def hf_layout(arch: str, key: str, values: torch.Tensor, config: dict) -> torch.Tensor:
    if arch.startswith(("llama", "mistral")) and (".q_proj." in key or ".k_proj." in key):
        heads = config["num_attention_heads"] if ".q_proj." in key else config["num_key_value_heads"]
        return unpermute(values, heads)
    return values


# ------------------------------------------------------------------------------------------------ tensors
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gemma2", "llama-tied", "mistral"])
def test_f16_tensors_equal_the_merged_export(trained, exported, arch):
    merged, reader, result = exported(arch, "f16")
    base, _ = trained(arch)
    config, original = read_config(base), checkpoint(base)
    tied = config.get("tie_word_embeddings", False) or arch.startswith("gemma")
    keys = [k for k in merged if not (tied and k == "lm_head.weight")]
    names = {llama_cpp_name(k, arch.split("-")[0]): k for k in keys}
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(names)  # every tensor, under llama.cpp's names, nothing else
    assert ("output.weight" in got) == (not tied)  # a tied head is the embedding in llama.cpp
    for name, key in names.items():
        tensor = got[name]
        assert tuple(reversed(tensor.shape.tolist())) == tuple(merged[key].shape), name
        kind = gguf.GGMLQuantizationType.F32 if merged[key].dim() == 1 else gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == kind, name
        values = hf_layout(arch, key, gguf_values(tensor), config)
        assert torch.equal(values, expected(arch, key, merged, original, config)), name
    assert result.merged_tensors == 14 and result.arch == {"mistral": "llama"}.get(arch, arch.split("-")[0])


def test_bf16_tensors_equal_the_bfloat16_export(exported):
    merged, reader, _ = exported("qwen2", "bf16")
    for tensor in reader.tensors:
        if len(tensor.shape) == 2:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16
            key = next(k for k in merged if llama_cpp_name(k, "qwen2") == tensor.name)
            assert torch.equal(gguf_values(tensor), merged[key].float()), tensor.name


@pytest.mark.parametrize("arch,gguf_type", [("llama", "q8_0"), ("qwen2", "q8_0"), ("gemma", "q8_0"), ("llama", "q4_0")])
def test_quantized_tensors_are_within_their_quantization_error(trained, exported, arch, gguf_type):
    merged, reader, result = exported(arch, gguf_type)
    config, original = read_config(trained(arch)[0]), checkpoint(trained(arch)[0])
    q = gguf.GGMLQuantizationType
    for tensor in reader.tensors:
        key = next(k for k in merged if llama_cpp_name(k, arch) == tensor.name)
        want = expected(arch, key, merged, original, config)
        values = hf_layout(arch, key, gguf_values(tensor), config)
        if want.dim() == 1:
            assert tensor.tensor_type == q.F32 and torch.equal(values, want), tensor.name
            continue
        head = tensor.name == (
            "token_embd.weight" if "output.weight" not in [t.name for t in reader.tensors] else "output.weight"
        )
        kind = q.Q8_0 if gguf_type == "q8_0" or head else q.Q4_0  # Q4_0 keeps the output head in Q8_0
        assert tensor.tensor_type == kind, tensor.name
        # absmax quantization per block of 32 with an fp16 scale d: Q8_0 rounds to steps of d = amax/127 (error
        # d/2, plus 127 times the scale's fp16 rounding of d/2048), Q4_0 to steps of d = amax/8 (clamped at one end)
        blocks = want.reshape(want.shape[0], -1, 32)
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        bound = amax / 127 * 0.57 if kind == q.Q8_0 else amax / 8 * 1.01
        error = values.reshape(blocks.shape) - blocks
        assert (error.abs() <= bound + 1e-7).all(), tensor.name


@pytest.mark.parametrize(
    "arch,gguf_type,tolerance",
    [("llama", "f16", 1e-6), ("llama-tied", "f16", 1e-6), ("qwen2", "f16", 1e-6), ("gemma2", "f16", 1e-6)]
    + [("llama", "q8_0", 5e-2), ("qwen2", "q4_0", 2e-1)],
)
def test_transformers_reads_the_gguf_as_the_merged_model(trained, exported, tmp_path, arch, gguf_type, tolerance):
    """transformers' GGUF loader, a second reader of llama.cpp's conventions (names, q/k permutation, Gemma's
    norms, metadata), rebuilds the merged model: the same logits as the safetensors export."""
    from transformers import AutoModelForCausalLM

    base, adapter = trained(arch)
    _, _, result = exported(arch, gguf_type)
    merged = export_merged(base, adapter, tmp_path / "merged", device="cpu")
    # llama.cpp scales Gemma 2's queries by 1/sqrt(head_dim); transformers' GGUF loader assumes its default 256
    extra = {"query_pre_attn_scalar": 16} if arch == "gemma2" else {}
    ours = AutoModelForCausalLM.from_pretrained(
        result.path.parent, gguf_file=result.path.name, dtype=torch.float32, **extra
    )
    want = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = torch.tensor([[1, *range(70, 100)]])
    with torch.no_grad():
        a, b = ours.eval()(ids).logits, want.eval()(ids).logits
    assert ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item() <= tolerance


# ----------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gemma2"])
def test_metadata_llama_cpp_requires(trained, exported, arch):
    _, reader, result = exported(arch, "q8_0" if arch != "gemma2" else "f16")
    base, _ = trained(arch)
    config = read_config(base)
    name = arch
    assert field(reader, "general.architecture") == name
    want = {
        f"{name}.context_length": 256, f"{name}.embedding_length": 64, f"{name}.block_count": 2,
        f"{name}.feed_forward_length": 192, f"{name}.attention.head_count": 4, f"{name}.attention.head_count_kv": 2,
        f"{name}.attention.key_length": 16, f"{name}.attention.value_length": 16, f"{name}.vocab_size": 320,
        f"{name}.rope.freq_base": 10000.0,
        "general.file_type": 7 if arch != "gemma2" else 1, "general.quantization_version": 2,
    }  # fmt: skip
    if arch == "llama":
        want["llama.rope.dimension_count"] = 16
    if arch == "gemma2":
        want |= {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0}
        want["gemma2.attention.sliding_window"] = config["sliding_window"]
    for key, value in want.items():
        assert field(reader, key) == pytest.approx(value), key
    assert field(reader, f"{name}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    # the tokenizer: one entry per embedding row, the specials, the template the adapter dir (here: base) holds
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 320
    assert tokens[:3] == ["<pad>", "<s>", "</s>"] and types[:3] == [3, 3, 3] and types[-1] == 5
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.merges") == []
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field(reader, "tokenizer.ggml.padding_token_id") == 0
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == make_tokenizer().chat_template


def test_tokenizer_with_merges_and_the_runs_chat_template(trained, tmp_path):
    """An adapter dir holding the run's tokenizer (as training saves it): its merges, its template with the default
    system prompt baked in, and a Modelfile whose TEMPLATE and SYSTEM reproduce that template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base, adapter = trained("llama")
    run_adapter = tmp_path / "adapter"
    shutil.copytree(adapter, run_adapter)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own split regex
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "hello world " * 20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    template = with_default_system(CHATML_CHAT_TEMPLATE, "You answer in one word.")
    fast.chat_template = template
    fast.save_pretrained(run_adapter)
    result = run_gguf_export(base, run_adapter, tmp_path / "bot", "q8_0", device="cpu")
    reader = gguf.GGUFReader(result.path)
    merges = field(reader, "tokenizer.ggml.merges")
    assert (
        field(reader, "tokenizer.ggml.pre") == "gpt-2"
        and len(merges) == len(json.loads(tok.to_str())["model"]["merges"]) > 0
    )
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[fast.convert_tokens_to_ids("<|im_end|>")] == "<|im_end|>"
    assert field(reader, "tokenizer.chat_template") == template
    assert field(reader, "tokenizer.ggml.eot_token_id") == fast.convert_tokens_to_ids("<|im_end|>")
    text = result.modelfile.read_text()
    assert result.path.name == "bot.gguf" and "FROM ./bot.gguf\n" in text and "ollama create bot -f Modelfile" in text
    assert 'SYSTEM """You answer in one word."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>user"' in text
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text


def test_sentencepiece_style_tokenizer_gets_scores_in_merge_order(trained, tmp_path):
    """A Llama 2 / Mistral / Gemma style tokenizer.json (BPE with byte fallback, '▁' for spaces): llama.cpp's
    SentencePiece model, byte tokens typed BYTE, and scores that rank each merged piece as its merge does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    base, adapter = trained("llama")
    run_adapter = tmp_path / "adapter"
    shutil.copytree(adapter, run_adapter)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    trainer = trainers.BpeTrainer(vocab_size=310, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(run_adapter)
    reader = gguf.GGUFReader(run_gguf_export(base, run_adapter, tmp_path / "out", "f16", device="cpu").path)
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("llama", "default")
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == 320
    assert types[0] == 2 and types[1] == 3 and types[3 + 0x41] == 6 and tokens[3 + 0x41] == "<0x41>"
    vocab = fast.get_vocab()
    for rank, (left, right) in enumerate(json.loads(tok.to_str())["model"]["merges"][:20]):
        assert scores[vocab[left + right]] == -(rank + 1)
    assert field(reader, "tokenizer.ggml.unknown_token_id") == 0


# ---------------------------------------------------------------------------------------------- Modelfile
def _render(template: str):
    tok = make_tokenizer()
    return lambda messages, generation: tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation, chat_template=template
    )


def test_chatml_translates_to_ollamas_chatml_template():
    fmt, why = infer_chat_format(_render(CHATML_CHAT_TEMPLATE))
    assert why == "" and fmt.default_system is None
    assert go_template(fmt) == (
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}'
        '{{ end }}{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}'
    )


def test_llama3_template_drops_the_bos_llama_cpp_adds():
    fmt, why = infer_chat_format(
        _render(LLAMA3_CHAT_TEMPLATE.replace("bos_token", "'<|begin_of_text|>'")), "<|begin_of_text|>"
    )
    assert why == ""
    assert fmt.first_prefix["system"] == "<|start_header_id|>system<|end_header_id|>\n\n"
    assert (
        fmt.suffix["assistant"] == "<|eot_id|>"
        and fmt.generation == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("template", [FALLBACK_CHAT_TEMPLATE, CHATML_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE])
def test_default_system_prompt_becomes_system(template):
    render = _render(with_default_system(template, "Be brief, 'always'."))
    fmt, why = infer_chat_format(render)
    assert why == "" and fmt.default_system == "Be brief, 'always'."
    # the Go template's pieces render every probe as the Jinja template does, the default system turn included
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"}]
    assert fmt.render(talk, True) == render(talk, True)


def test_untranslatable_template_falls_back_to_the_plain_template(trained, tmp_path):
    llama2 = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
        "{% elif m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>{{ messages[0]['content'] }}<</SYS>> "
        "{% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    fmt, why = infer_chat_format(_render(llama2))
    assert fmt is None and why
    base, adapter = trained("llama")
    run_adapter = tmp_path / "adapter"
    shutil.copytree(adapter, run_adapter)
    tok = make_tokenizer()
    tok.chat_template = llama2
    tok.save_pretrained(run_adapter)
    result = run_gguf_export(base, run_adapter, tmp_path / "out", "f16", device="cpu")
    text = result.modelfile.read_text()
    assert not result.template_translated
    assert "# The chat template could not be translated" in text and f'TEMPLATE """{PLAIN_TEMPLATE}"""' in text
    assert field(gguf.GGUFReader(result.path), "tokenizer.chat_template") == llama2  # llama.cpp still has it


# ----------------------------------------------------------------------------------------- command line
def test_cli_writes_gguf_and_modelfile_atomically_with_the_umask(trained, tmp_path, capsys):
    base, adapter = trained("qwen2")
    out = tmp_path / "exports" / "My Bot"
    old = os.umask(0o027)
    try:
        code = main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--format", "gguf"])
    finally:
        os.umask(old)
    printed = capsys.readouterr().out
    assert code == 0 and "q8_0" in printed and f"ollama create my-bot -f {out}/Modelfile" in printed
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "my-bot.gguf"]
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640} and out.stat().st_mode & 0o777 == 0o750
    assert [p.name for p in out.parent.iterdir()] == ["My Bot"]  # no temporaries or locks left behind


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--gguf-type", "q5_k"], "GGUF type 'q5_k' is not supported; use f16, bf16, q8_0 or q4_0"),
        (["--verify"], "drop --verify with --format gguf"),
    ],
)
def test_cli_refusals_leave_nothing(trained, tmp_path, capsys, extra, fragment):
    base, adapter = trained("llama")
    code = main(
        [
            "export",
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--out",
            str(tmp_path / "o"),
            "--format",
            "gguf",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_is_refused_before_any_file(tmp_path, tiny_model_dir):
    base = tiny_model_dir("phi3")
    model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
    apply_lora(model, r=4, alpha=8, seed=0)
    adapter = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ExportError, match="is a phi3 model, which the GGUF export does not support"):
        run_gguf_export(base, adapter, tmp_path / "out", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_gemma_with_its_own_output_head_is_refused(tmp_path):
    from qlora_lite.model.tiny import save_tiny_model

    base = save_tiny_model(tmp_path / "base", "gemma", tie_word_embeddings=False)
    model, _ = load_quantized(base, device="cpu", load_tokenizer=False)
    apply_lora(model, r=4, alpha=8, seed=0)
    adapter = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ExportError, match="output head of its own"):
        run_gguf_export(base, adapter, tmp_path / "out", "f16")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ memory
MIB = 2**20
CHILD = r"""
import os, sys, warnings
warnings.filterwarnings("ignore")
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers.utils import logging
logging.set_verbosity_error()
from qlora_lite.export.gguf import run_gguf_export
base, adapter, out, tiny_base, tiny_adapter = sys.argv[1:6]
run_gguf_export(tiny_base, tiny_adapter, out + "-warmup", "q8_0", device="cpu")
print("warm", flush=True)
sys.stdin.readline()
run_gguf_export(base, adapter, out, "q8_0", device="cpu")
print("done", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads VmHWM from /proc")
def test_gguf_export_peak_rss_is_bounded(tmp_path):
    """Peak resident memory above the warmed-up baseline stays near one tensor's working set (fp32 read + merged
    fp16 + quantized copy), far below the model's size."""
    tool = load_tool("measure_export_memory")
    models = tool.make_models(tmp_path, hidden=512, layers=12, vocab=4096, shard_size="16MB")
    for name in ("base", "tiny_base"):
        make_tokenizer().save_pretrained(models[name])
    out = tmp_path / "out"
    argv = [sys.executable, "-c", CHILD, str(models["base"]), str(models["adapter"]), str(out)]
    argv += [str(models["tiny_base"]), str(models["tiny_adapter"])]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"warm", proc.stderr.read().decode()[-2000:]
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
    baseline = tool.proc_status(proc.pid, "VmRSS")
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == b"done", proc.stderr.read().decode()[-2000:]
    peak = tool.proc_status(proc.pid, "VmHWM")
    proc.communicate(b"")
    gguf_bytes = next(out.glob("*.gguf")).stat().st_size  # ~39 MiB of Q8_0
    model_bytes = sum(p.stat().st_size for p in models["base"].glob("*.safetensors"))  # ~74 MiB of bf16
    largest = tool.largest_tensor_fp32(models["base"])  # the embedding: 8 MiB in fp32
    above = peak - baseline
    print(f"\n  gguf q8_0 export: peak {above / MIB:.1f} MiB above baseline, file {gguf_bytes / MIB:.1f} MiB")
    assert above <= 2 * largest + 32 * MIB, f"peak {above / MIB:.0f} MiB above baseline"
    # an export that held the merged model (or half of it) could not stay under this
    assert above < 0.4 * model_bytes, f"peak {above / MIB:.0f} MiB vs model {model_bytes / MIB:.0f} MiB"


# --------------------------------------------------------------------------------------------- llama.cpp
def _llama_cpp():
    try:
        import llama_cpp

        llama_cpp.llama_backend_init()
    except Exception:  # not installed, or its shared library does not load here
        return None
    return llama_cpp


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gemma2"])
def test_llama_cpp_greedy_tokens_equal_transformers(trained, exported, tmp_path, arch):
    llama_cpp = _llama_cpp()
    if llama_cpp is None:
        pytest.skip("llama-cpp-python is not importable")
    from transformers import AutoModelForCausalLM

    _, _, result = exported(arch, "f16")
    base, adapter = trained(arch)
    merged = export_merged(base, adapter, tmp_path / "merged", device="cpu")
    prompt = [1, *range(70, 90)]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()
    llm = llama_cpp.Llama(str(result.path), n_ctx=64, logits_all=False, verbose=False)
    llm.reset()
    llm.eval(prompt)
    got = []
    for _ in range(12):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(token)
        llm.eval([token])
    assert got == want
