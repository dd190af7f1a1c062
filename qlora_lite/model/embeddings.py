"""New tokens: adding them to the tokenizer, growing the embeddings to fit, and training only their rows.

`add_special_tokens` adds tokens as special tokens (one already in the vocabulary is refused). `resize_embeddings`
grows the input embedding and `lm_head` (bf16 in our loader: only targeted linears are quantized) to exactly the
tokenizer's length, new rows set to the mean of the old ones (kept tied when the model ties them).
`apply_trainable_tokens` wraps `embed_tokens` and `lm_head` in `TrainableTokens`: peft's `TrainableTokensLayer`
(`trainable_token_indices`), a `trainable_tokens_delta` parameter holding the full values of the chosen rows, which
replace the base's rows in the forward; the rest of the matrix stays frozen.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError

EMBED_NAME = "embed_tokens"
HEAD_NAME = "lm_head"


def add_special_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` to the tokenizer as special tokens and return their ids; `ConfigError` for one already there."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise ConfigError(f"data.add_special_tokens holds {token!r}; list non-empty token strings.")
        if token in vocab:
            raise ConfigError(
                f"data.add_special_tokens: {token!r} is already in the tokenizer's vocabulary (id {vocab[token]}); "
                "remove it from the list."
            )
    if len(set(tokens)) != len(tokens):
        raise ConfigError("data.add_special_tokens lists a token twice; list each new token once.")
    if tokens:
        tokenizer.add_tokens(list(tokens), special_tokens=True)
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def _mean_grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with rows appended up to `rows`, each the fp32 mean of the old rows cast to the weight's dtype."""
    grown = torch.empty((rows, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    grown[: weight.shape[0]] = weight
    grown[weight.shape[0] :] = weight.float().mean(dim=0).to(weight.dtype)
    return grown


def resize_embeddings(model: nn.Module, rows: int) -> list[int]:
    """Grow the input embedding and output head to `rows` (never shrink); new rows are the mean of the old ones.

    Returns the new row ids (empty when the embedding already had `rows` or more). The config's `vocab_size` follows.
    """
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    old = embed.weight.shape[0]
    if rows <= old:
        return []
    tied = head is not None and head.weight is embed.weight
    with torch.no_grad():
        embed.weight = nn.Parameter(_mean_grown(embed.weight.detach(), rows), requires_grad=False)
        embed.num_embeddings = rows
        if head is not None:
            if tied:
                head.weight = embed.weight
            else:
                head.weight = nn.Parameter(_mean_grown(head.weight.detach(), rows), requires_grad=False)
                if getattr(head, "bias", None) is not None:
                    head.bias = nn.Parameter(_mean_grown(head.bias.detach(), rows), requires_grad=False)
            head.out_features = rows
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    text_config.vocab_size = rows
    model.config.vocab_size = rows
    return list(range(old, rows))


class TrainableTokens(nn.Module):
    """peft's `TrainableTokensLayer`: the rows `token_indices` of a frozen embedding or linear head come from the
    trainable `trainable_tokens_delta` ([len(indices), dim], the rows' full values, not differences)."""

    def __init__(self, base_layer: nn.Module, token_indices: list[int], delta: nn.Parameter | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.token_indices = list(token_indices)
        self.register_buffer(
            "index",
            torch.tensor(self.token_indices, dtype=torch.long, device=base_layer.weight.device),
            persistent=False,
        )
        if delta is None:
            delta = nn.Parameter(base_layer.weight.detach()[self.index].clone(), requires_grad=True)
        self.trainable_tokens_delta = delta

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight with the trainable rows put in (gradients flow to those rows only)."""
        base = self.base_layer.weight
        return base.index_copy(0, self.index, self.trainable_tokens_delta.to(base.dtype))

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            return F.embedding(x, self.weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"trainable rows={len(self.token_indices)}"


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def apply_trainable_tokens(model: nn.Module, token_indices: list[int]) -> dict[str, list[int]]:
    """Train only rows `token_indices` of the input embedding and (untied) output head, peft's way; in place.

    Returns peft's `trainable_token_indices` ({"embed_tokens": [...], "lm_head": [...]}, the head only when untied),
    which is also kept on the model as `model.qlora_tokens`. A tied head shares the embedding's delta, as in peft.
    """
    indices = sorted(set(int(i) for i in token_indices))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    wrapped_embed = TrainableTokens(embed, indices)
    _replace(model, _module_path(model, embed), wrapped_embed)
    spec = {EMBED_NAME: indices}
    if head is not None:
        shared = wrapped_embed.trainable_tokens_delta if tied else None
        path = _module_path(model, head)
        _replace(model, path, TrainableTokens(head, indices, shared))
        if not tied:
            spec[HEAD_NAME] = indices
    model.qlora_tokens = spec
    return spec


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def token_layers(model: nn.Module) -> dict[str, TrainableTokens]:
    """Each `TrainableTokens` layer by module path (a tied head, which shares the embedding's delta, left out)."""
    layers: dict[str, TrainableTokens] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, TrainableTokens) and id(module.trainable_tokens_delta) not in seen:
            seen.add(id(module.trainable_tokens_delta))
            layers[name] = module
    return layers


def token_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained rows keyed as peft saves them: `<module path>.token_adapter.trainable_tokens_delta`."""
    return {
        f"{name}.token_adapter.trainable_tokens_delta": m.trainable_tokens_delta
        for name, m in token_layers(model).items()
    }


__all__ = [
    "add_special_tokens",
    "resize_embeddings",
    "TrainableTokens",
    "apply_trainable_tokens",
    "token_layers",
    "token_state_dict",
]
