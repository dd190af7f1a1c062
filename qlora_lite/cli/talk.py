"""What `chat` and `generate` share: the model arguments, sampling flags, and loading."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(p: Any) -> None:
    """--model, --adapter, --revision, --device, --trust-remote-code and the sampling flags."""
    p.add_argument(
        "--model", required=True, help="base model (dir or hub id) with --adapter, or a merged / plain model dir"
    )
    p.add_argument(
        "--adapter", default=None, help="adapter dir (PEFT format); the base is quantized as the adapter records"
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub-id --model (default: main)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model dir")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most per answer")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus sampling: keep the smallest set of tokens with this mass"
    )
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (deterministic)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")


def sampling_from(args: argparse.Namespace):
    """The `Sampling` settings from the flags, checked."""
    import math

    from ..errors import UsageError
    from ..generate.stream import Sampling

    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens is {args.max_new_tokens}; give a positive number of tokens.")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature is {args.temperature}; give 0 (greedy) or a positive number such as 0.7.")
    if not math.isfinite(args.top_p) or not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p is {args.top_p}; give a number in (0, 1] such as 0.9.")
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.greedy, args.seed)


def load(args: argparse.Namespace):
    """The model and tokenizer the flags name (`generate.load.LoadedModel`)."""
    from ..generate.load import load_for_generation

    return load_for_generation(args.model, args.adapter, args.device, args.trust_remote_code, args.revision)
