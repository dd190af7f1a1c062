"""Tiny random models and an offline byte-level tokenizer, for the demo, the tests and the tools.

Nothing here touches a model hub: configs are built in code, weights are random, the tokenizer is
made with the `tokenizers` library from the 256 byte values.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
TOKENIZER_VOCAB = 256 + len(SPECIAL_TOKENS)
ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gemma", "phi3")

# A minimal chat template (role headers, assistant turns closed by </s>) so chat data works offline.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer without merges: every byte is a token, plus <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 320, hidden_size: int = 64, layers: int = 2, **overrides):
    """A transformers config of the given family with tiny sizes (GQA for the Llama-like ones)."""
    from transformers import AutoConfig

    heads, kv_heads = 4, 2
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        kwargs = dict(n_embd=hidden_size, n_layer=layers, n_head=heads, n_positions=256, **common)
    else:
        kwargs = dict(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 3,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=256,
            tie_word_embeddings=arch in ("gemma", "qwen2"),
            **common,
        )
        if arch == "gemma":
            kwargs["head_dim"] = hidden_size // heads
        if arch == "phi3":
            kwargs["num_key_value_heads"] = heads
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def save_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Write a random tiny model as a Hugging Face dir (config.json + safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    if with_tokenizer:
        make_tokenizer().save_pretrained(out_dir)
    return out_dir
