"""Causal-LM loss without the full-vocabulary logits: `lm_head` + cross-entropy, chunk by chunk.

transformers computes logits for every position ([tokens, vocab] in bf16), upcasts them to fp32 for the
loss and keeps both for backward: with a 128k vocabulary and 2048 tokens that is 1.5 GiB per sequence.
Here the rows are processed `chunk_size` tokens at a time: each chunk's fp32 logits give its loss and,
immediately, its gradient with respect to the hidden states (softmax - one-hot), so only one chunk of
logits ever exists and backward just scales the stored hidden-state gradient (as Liger-Kernel's fused
linear cross-entropy does). A frozen `lm_head` gets no gradient; a trainable one accumulates it per chunk.

Packed batches (`position_ids` restarting at 0 per record) get block-diagonal causal attention
(`packed_attention`), so the records of a pack never attend to each other.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 128  # 128 tokens x 128k vocab x fp32 = 64 MiB of logits per chunk


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, normalizer: float, softcap: float):
        n_tokens = hidden.shape[0]
        needs_hidden_grad = hidden.requires_grad
        needs_weight_grad = weight.requires_grad
        grad_hidden = torch.zeros_like(hidden) if needs_hidden_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight_grad else None
        )
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if bias is not None and bias.requires_grad
            else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n_chunks = -(-n_tokens // chunk_size)
        labelled = torch.nn.functional.pad(labels != IGNORE_INDEX, (0, n_chunks * chunk_size - n_tokens))
        chunk_has_targets = (
            labelled.view(n_chunks, chunk_size).any(dim=1).tolist()
        )  # one device sync, not one per chunk
        # The same [chunk, vocab] buffers for every chunk: the matmul writes into `low` (the weight's dtype), the fp32
        # logits (then their gradient) live in `high`, and the gradient goes back through `low`. Fresh buffers per
        # chunk cost the CPU a slow first write each (3x slower casts); the peak stays 6 bytes per logit (bf16).
        # An explicit `out=` needs the dtype autocast would give the product, and inputs already in it.
        kind = hidden.device.type
        product_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        head, inputs = weight.to(product_dtype), hidden.to(product_dtype)
        rows_max = min(chunk_size, n_tokens)
        high = torch.empty((rows_max, weight.shape[0]), dtype=torch.float32, device=hidden.device)
        same = product_dtype == torch.float32
        low = high if same else torch.empty((rows_max, weight.shape[0]), dtype=product_dtype, device=hidden.device)
        for index, start in enumerate(range(0, n_tokens, chunk_size)):
            if not chunk_has_targets[index]:
                continue
            rows = slice(start, min(start + chunk_size, n_tokens))
            target = labels[rows]
            valid = target != IGNORE_INDEX
            h = hidden[rows]
            n = h.shape[0]
            product = torch.mm(inputs[rows], head.t(), out=low[:n])
            logits = product if same else high[:n].copy_(product)  # the logits, then their gradient
            if bias is not None:
                logits += bias.float()
            capped_tanh = None
            if softcap:
                capped_tanh = torch.tanh(logits.div_(softcap))
                logits = torch.mul(capped_tanh, softcap, out=logits)
            safe_target = target.masked_fill(~valid, 0)
            picked = logits.gather(1, safe_target.unsqueeze(1)).squeeze(1)
            # log-sum-exp and softmax from one exp pass, in place: e = exp(logits - max), lse = max + log(sum e)
            peak = logits.amax(dim=1, keepdim=True)
            exps = logits.sub_(peak).exp_()
            sums = exps.sum(dim=1)
            lse = peak.squeeze(1) + sums.log()
            total += ((lse - picked) * valid).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d(loss)/d(logits) = softmax - one_hot, zero on ignored rows, divided by the normaliser: e * (w / sum e)
            # then - w at the targets, w = valid / normaliser
            row_weight = valid.float() / normalizer
            grad_logits = exps.mul_((row_weight / sums).unsqueeze(1))
            grad_logits[torch.arange(grad_logits.shape[0], device=grad_logits.device), safe_target] -= row_weight
            if capped_tanh is not None:
                grad_logits *= capped_tanh.square_().neg_().add_(1.0)
            if grad_hidden is not None:
                back = grad_logits if same else low[:n].copy_(grad_logits)
                grad_hidden[rows] = torch.mm(back, head).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, exps, grad_logits, capped_tanh, product
        del low, high, head, inputs
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.to(torch.float32)
        gh = None if grad_hidden is None else (grad_hidden.float() * scale).to(grad_hidden.dtype)
        gw = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        gb = None if grad_bias is None else (grad_bias * scale).to(ctx.weight_dtype)
        return gh, gw, gb, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
    normalizer: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum of token cross-entropies of `hidden @ weight.T` against `labels`, divided by `normalizer`.

    `hidden` is [tokens, hidden] (already aligned with `labels`, i.e. shifted), `labels` uses -100 for
    tokens without loss. `normalizer` defaults to the number of labelled tokens (a mean).
    """
    labels = labels.reshape(-1)
    hidden = hidden.reshape(labels.shape[0], -1)
    if normalizer is None:
        normalizer = float(max(int((labels != IGNORE_INDEX).sum()), 1))
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, int(chunk_size), float(normalizer), float(softcap or 0.0)
    )


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the positions that predict them: labels[:, 1:] padded with -100 at the end."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _softcap(config) -> float | None:
    return getattr(config, "final_logit_softcapping", None)


def supports_chunked_loss(model: nn.Module) -> bool:
    """True when the model's logits are exactly `lm_head(last hidden state)` (optionally soft-capped)."""
    config = model.config
    if getattr(config, "logit_scale", None) not in (None, 1.0) or getattr(config, "logits_scaling", None) not in (
        None,
        1.0,
    ):
        return False
    head = model.get_output_embeddings()
    return isinstance(head, nn.Linear) and hasattr(model, "base_model") and model.base_model is not model


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment index of every token of a packed batch: a new segment starts wherever a position is not the previous
    one plus 1 (as transformers' `find_packed_sequence_indices` reads packed position ids)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def packed_attention(model: nn.Module, position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(attention_mask, position_ids) to pass for a packed batch so that each record attends only to itself.

    flash-attention (and any other implementation than sdpa/eager, e.g. flex) gets no mask: transformers derives the
    packed layout from `position_ids` itself there. sdpa gets a boolean [b, 1, s, s] block-diagonal causal mask
    (True = attend) and eager the same as an additive mask (0 or the dtype's minimum); transformers passes a 4D mask
    through as it is. Right padding forms segments of its own, so real tokens never see it.
    """
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return None, position_ids
    seg = packed_segments(position_ids)
    s = position_ids.shape[1]
    causal = torch.ones((s, s), dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg.unsqueeze(2) == seg.unsqueeze(1)) & causal  # [b, s, s]
    allowed = allowed.unsqueeze(1)
    if impl == "sdpa":
        return allowed, position_ids
    dtype = model.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min), position_ids


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
    normalizer: float | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token loss of a causal LM; chunked `lm_head` + cross-entropy when the model allows it.

    Equals `model(input_ids, labels=labels).loss` (a mean over labelled tokens) when `normalizer` is None;
    pass the token count of a whole accumulated batch as `normalizer` to sum micro-batches correctly.
    `chunk_size` <= 0 computes the full logits as transformers does. `position_ids` (a packed batch: positions
    restart at 0 per record) replace `attention_mask` by block-diagonal causal attention (`packed_attention`).
    """
    extra = {}
    if position_ids is not None:
        attention_mask, extra["position_ids"] = packed_attention(model, position_ids)
    targets = shift_labels(labels)
    if normalizer is None:
        normalizer = float(max(int((targets != IGNORE_INDEX).sum()), 1))
    if chunk_size <= 0 or not supports_chunked_loss(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits.float()
        losses = nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return losses / normalizer
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
    ).last_hidden_state
    head = model.get_output_embeddings()
    return chunked_cross_entropy(
        hidden.flatten(0, 1),
        head.weight,
        targets.flatten(),
        bias=head.bias,
        chunk_size=chunk_size,
        normalizer=normalizer,
        softcap=_softcap(model.config),
    )
