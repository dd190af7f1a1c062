"""Everything a run needs before its first step: tokenizer (with the chat template the run uses), data, the
quantized model with LoRA and checkpointing, and the adapter optimizer. Tokenizer, context length and data come
first, so bad data fails in seconds, before a large base loads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config.settings import DataConfig, TrainConfig
from ..data.chat import (
    FALLBACK_CHAT_TEMPLATE,
    KNOWN_TEMPLATES,
    check_chat_template,
    read_chat_template,
    with_default_system,
)
from ..data.encode import TokenizedDataset, prepare_data
from ..errors import ConfigError, DataError
from ..model import loader
from ..model.embeddings import add_special_tokens, apply_trainable_tokens, resize_embeddings
from ..model.lora import apply_lora, apply_modules_to_save
from .checkpointing import enable_gradient_checkpointing
from .compile import compile_decoder_layers
from .distributed import SINGLE, World
from .optim import AdapterOptimizer
from .tiled_mlp import enable_tiled_mlp


@dataclass
class RunParts:
    """The objects a training run works with."""

    tokenizer: object
    train_data: TokenizedDataset
    eval_data: TokenizedDataset | None
    model: torch.nn.Module
    optimizer: AdapterOptimizer
    notices: list[str] = field(default_factory=list)  # said at the start of the run (Reporter.on_start)


FALLBACK_NOTICE = (
    "the tokenizer has no chat template, so messages records use qlora-lite's fallback template; it is saved with "
    "the adapter and the merged export so chat and generate format conversations the same way (set "
    "data.chat_template to choose another)"
)


def _uses_messages(*datasets: TokenizedDataset | None) -> bool:
    return any(ds is not None and ds.stats.formats.get("messages") for ds in datasets)


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_NOTICE = (
    "the tokenizer has no chat template and data.add_special_tokens adds <|im_start|> and <|im_end|>, so messages "
    "records use ChatML with those as single tokens (set data.chat_template to choose another)"
)


def choose_chat_template(data: DataConfig, tokenizer) -> list[str]:
    """Set `tokenizer.chat_template` to what `data.chat_template` names (checked to render); empty keeps the
    tokenizer's own, and a tokenizer without one to which the user adds ChatML's markers gets ChatML (real special
    tokens rather than the fallback's text markers). Returns the notices; raises `ConfigError` naming the setting."""
    if data.chat_template:
        template = read_chat_template(data.chat_template)
        check_chat_template(tokenizer, template, f"data.chat_template {data.chat_template}")
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None) and set(CHATML_TOKENS) <= set(data.add_special_tokens):
        tokenizer.chat_template = KNOWN_TEMPLATES["chatml"]
        return [CHATML_NOTICE]
    return []


def finish_chat_template(data: DataConfig, tokenizer, uses_messages: bool) -> list[str]:
    """After the data is encoded: the fallback becomes the tokenizer's template when messages records used it, and
    `data.system_prompt` is built into the template, so the adapter and the export carry what training rendered.
    Returns the notices to show at the start of the run."""
    notices = []
    if uses_messages and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        notices.append(FALLBACK_NOTICE)
    template = getattr(tokenizer, "chat_template", None)
    if data.system_prompt and template:
        if isinstance(template, dict):  # several named templates: each gets the default system turn
            tokenizer.chat_template = {k: with_default_system(v, data.system_prompt) for k, v in template.items()}
        else:
            tokenizer.chat_template = with_default_system(template, data.system_prompt)
    return notices


@dataclass
class PreparedData:
    """The tokenizer and encoded data of a run, before its model loads."""

    tokenizer: object
    train_data: TokenizedDataset
    eval_data: TokenizedDataset | None
    notices: list[str]
    new_token_ids: list[int]  # ids of tokens `data.add_special_tokens` added to the tokenizer


def prepare_tokenizer_and_data(config: TrainConfig) -> PreparedData:
    """The tokenizer and data exactly as a run prepares them, without loading the weights: the model's config.json
    and tokenizer are checked against the data settings, then the records are encoded."""
    model_dir = loader.check_model_dir(config.model, config.revision)
    model_config = loader.load_config(model_dir, config.trust_remote_code)  # before the tokenizer, which reads it too
    tokenizer = loader.load_tokenizer_from(model_dir, config.trust_remote_code)
    if tokenizer is None:
        raise DataError(
            f"the model directory {model_dir} has no tokenizer files; copy the tokenizer next to config.json."
        )
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    new_token_ids = add_special_tokens(tokenizer, list(config.data.add_special_tokens))
    embedding_rows = getattr(text_config, "vocab_size", None)
    if embedding_rows and len(tokenizer) > embedding_rows and not config.data.resize_embeddings:
        raise DataError(  # a token id past the embedding fails at step 1
            f"the tokenizer in {model_dir} has {len(tokenizer)} tokens but the model's embedding has {embedding_rows} "
            "rows; use the tokenizer that came with the model, or set data.resize_embeddings: true to grow it."
        )
    context = getattr(text_config, "max_position_embeddings", None)
    if context and config.data.max_seq_len > context:
        raise ConfigError(
            f"data.max_seq_len is {config.data.max_seq_len}, longer than the model's context of {context} tokens; "
            f"set data.max_seq_len <= {context}."
        )
    notices = choose_chat_template(config.data, tokenizer)
    train_ds, eval_ds = prepare_data(config.data, tokenizer, config.train.seed)
    notices += finish_chat_template(config.data, tokenizer, _uses_messages(train_ds, eval_ds))
    return PreparedData(tokenizer, train_ds, eval_ds, notices, list(new_token_ids))


def _vocab_modules_saved(model: torch.nn.Module, paths: list[str]) -> bool:
    """Whether modules_to_save trains the embedding and output head whole (then new tokens need no row deltas);
    `ConfigError` when it covers only one of them, which would leave the other's new rows untrained."""
    vocab = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    covered = [any(model.get_submodule(p) is m for p in paths) for m in vocab]
    if any(covered) and not all(covered):
        raise ConfigError(
            "lora.modules_to_save names only one of embed_tokens and lm_head while data.add_special_tokens adds "
            "tokens; name both so every new row trains."
        )
    return bool(covered) and all(covered)


def prepare_run(config: TrainConfig, device: torch.device, world: World = SINGLE) -> RunParts:
    """Tokenizer and data (checked first), then the quantized base with LoRA, checkpointing and the optimizer.
    With `train.fsdp` in a torchrun launch, the base loads sharded over the ranks (`fsdp.load_sharded`)."""
    s = config.train
    data = prepare_tokenizer_and_data(config)
    tokenizer, train_ds, eval_ds, notices, new_token_ids = (
        data.tokenizer, data.train_data, data.eval_data, data.notices, data.new_token_ids
    )  # fmt: skip
    model_dir = loader.check_model_dir(config.model, config.revision)
    q, lc = config.quant, config.lora
    if s.fsdp and world.distributed:
        return RunParts(tokenizer, train_ds, eval_ds, *_sharded_model(config, model_dir, world, device), notices)
    if s.fsdp:
        notices.append("train.fsdp shards over the ranks of a torchrun launch; this is one process, so it is off")
    model, _ = loader.load_quantized(
        model_dir, q.bits, q.quant_type, q.double_quant, device, lc.target_modules, blocksize=q.blocksize,
        int8_threshold=q.int8_threshold, trust_remote_code=config.trust_remote_code, load_tokenizer=False,
    )  # fmt: skip
    if config.data.resize_embeddings:
        new_token_ids += resize_embeddings(model, len(tokenizer))
    apply_lora(
        model, lc.r, lc.alpha, lc.dropout, lc.target_modules, rslora=lc.rslora,
        adapter_dtype=getattr(torch, lc.adapter_dtype), seed=s.seed, use_dora=lc.use_dora,
    )  # fmt: skip
    whole = apply_modules_to_save(model, list(lc.modules_to_save)) if lc.modules_to_save else []
    if new_token_ids and not _vocab_modules_saved(model, whole):  # peft's trainable_token_indices: only new rows train
        apply_trainable_tokens(model, new_token_ids)
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=s.offload_activations, every=s.checkpoint_every)
    if s.tiled_mlp:
        enable_tiled_mlp(model)
    if s.compile:
        compile_decoder_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdapterOptimizer(params, s.optimizer, lr=s.lr, weight_decay=s.weight_decay)
    return RunParts(tokenizer, train_ds, eval_ds, model, optimizer, notices)


def _sharded_model(config: TrainConfig, model_dir, world: World, device: torch.device):
    """(model, optimizer) of a sharded run: the base loaded and sharded with LoRA, checkpointing, the optimizer over
    this rank's shards."""
    from .fsdp import load_sharded

    s = config.train
    model, _ = load_sharded(
        model_dir, world, device, config.quant, config.lora, seed=s.seed, trust_remote_code=config.trust_remote_code
    )
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=s.offload_activations, every=s.checkpoint_every)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, AdapterOptimizer(params, s.optimizer, lr=s.lr, weight_decay=s.weight_decay)
