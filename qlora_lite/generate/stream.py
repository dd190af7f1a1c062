"""Generation with transformers' `generate`, streamed as text, stopping at the chat template's end of turn."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# End-of-turn markers of common chat templates; whichever the tokenizer has as one token stops generation.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class Sampling:
    """Sampling settings, as transformers' `generate` names them; `greedy` turns sampling off."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    greedy: bool = False
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate`."""
        if self.greedy or self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}  # fmt: skip


def stop_token_ids(tokenizer, model) -> list[int]:
    """EOS of the tokenizer and the generation config, plus any end-of-turn marker that is one token."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in configured if isinstance(configured, (list, tuple)) else [configured]:
        if value is not None:
            ids.append(int(value))
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[marker] for marker in END_OF_TURN if marker in vocab)
    return sorted(set(ids))


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        """transformers' incremental decoder, handing each finished piece of text to a callback."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def generate_text(
    model, tokenizer, prompt_ids: list[int], sampling: Sampling, on_text: Callable[[str], None] | None = None
) -> tuple[str, list[int]]:
    """Continue `prompt_ids`; return (text, new token ids), streaming text pieces to `on_text` as they form."""
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(p.device for p in model.parameters())
    ids = torch.tensor([prompt_ids], device=device)
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=stops or None, pad_token_id=pad,
        streamer=_streamer(tokenizer, on_text) if on_text is not None else None, **sampling.generate_kwargs(),
    )  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    while new and new[-1] in stops:
        new.pop()
    return tokenizer.decode(new, skip_special_tokens=True), new
