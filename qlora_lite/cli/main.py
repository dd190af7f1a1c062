"""`qlora-lite` command line: train, export, memory, demo.

Each sub-command parses its arguments, calls the library, and renders the result with rich.
A `QloraLiteError` becomes one line on stderr and exit code 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Sequence

from ..errors import QloraLiteError


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _quiet_libraries() -> None:
    """Keep third-party chatter (load bars, bitsandbytes notices) out of our output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", category=UserWarning)
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    from ..config.settings import field_help

    keys = "\n".join(f"  --{key} (default {default}): {help_}" for key, default, help_ in field_help())
    p = sub.add_parser(
        "train",
        help="fine-tune with QLoRA from a YAML config",
        description="Fine-tune with QLoRA. Every config key can be overridden as --section.key value.",
        epilog="config keys:\n" + keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML training config")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.set_defaults(handler=_cmd_train, accepts_overrides=True)


def _cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from ..config.load import load_config
    from .progress import RichReporter, summary_table
    from ..training.loop import train

    config = load_config(args.config, overrides)
    console = _console()
    reporter = RichReporter(console, title="train")
    try:
        result = train(config, resume=args.resume, reporter=reporter)
    finally:
        reporter.close()
    console.print(summary_table(result))
    return 0


# ---------------------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="merge an adapter into the base and write fp16/bf16 weights",
        description="Merge a LoRA adapter into its base model and write a plain fp16/bf16 Hugging Face model dir, "
        "streaming the base one tensor at a time.",
    )
    p.add_argument("--base", required=True, help="base model directory")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument(
        "--merge-into",
        default="dequantized",
        choices=["dequantized", "original"],
        help="dequantized (default): the quantized weights the adapter was trained against, same behaviour as in "
        "training; original: the checkpoint's full-precision weights (the adapter may drift, check with --verify)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--verify", action="store_true", help="compare the merged model's logits with base + adapter")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the base directory (config.json auto_map); only for code you trust")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from ..export.hf_dir import run_export

    console = _console()

    def say(text: str) -> None:
        console.print(text, soft_wrap=True, markup=False)  # paths are neither wrapped nor read as markup

    result = run_export(
        args.base, args.adapter, args.out, args.dtype, args.merge_into,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    say(
        f"merged {result.merged_tensors} LoRA weights into the {result.merge_into} base: {result.path} "
        f"({result.dtype}, {len(result.shard_files)} shard(s), {result.total_bytes / 2**20:.1f} MiB)"
    )
    if result.merge_into == "dequantized":
        q = result.quant
        kind = "8-bit LLM.int8" if q.bits == 8 else f"4-bit {q.quant_type}, double quant {q.double_quant}, blocksize {q.blocksize}"
        origin = "recorded in the adapter" if result.quant_recorded else "not recorded in the adapter, assumed the QLoRA defaults"
        say(f"quantization: {kind} ({origin})")
    if not args.verify:
        return 0
    from ..export.verify import VERIFY_TOLERANCE, verify_merged

    check = verify_merged(result.path, args.base, args.adapter)
    say(
        f"verify: largest relative logit difference {check.max_rel:.2e}, mean {check.mean_rel:.2e} over {check.tokens} tokens "
        f"(merged {check.dtype} vs quantized base + adapter, {check.compute_dtype} compute)"
    )
    if check.max_rel < VERIFY_TOLERANCE:
        return 0
    if result.merge_into == "original":
        say("note: merging into the original weights removes the quantization error the adapter was trained with, so larger differences are expected.")
        return 0
    _console(stderr=True).print(f"[bold red]verify failed:[/] largest difference {check.max_rel:.2e} is above {VERIFY_TOLERANCE:g}.", soft_wrap=True)
    return 1


# ------------------------------------------------------------------------------------------ demo
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="offline quick start: a tiny model learns a task with 4-bit QLoRA (about a minute on 2 CPU cores)",
        description="Pre-train a tiny model to copy words, then teach it a Caesar shift with 4-bit QLoRA; "
        "shows eval loss, accuracy and generations before and after. Runs offline.",
    )
    p.add_argument("--out", default="runs/demo", help="where the demo writes its base model, data, run and merged model")
    p.add_argument("--steps", type=int, default=80, help="QLoRA training steps")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from rich.table import Table

    from ..demo.run import run_demo
    from .progress import RichReporter, summary_table

    console = _console()
    reporter = RichReporter(console, title="QLoRA")
    try:
        demo = run_demo(args.out, reporter=reporter, on_stage=lambda msg: console.print(f"[bold]>[/] {msg}"),
                        train_steps=args.steps)
    finally:
        reporter.close()
    console.print(summary_table(demo.train, title="QLoRA run"))
    table = Table(title="the shift task (each letter one on), before and after QLoRA")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("eval loss", f"{demo.eval_loss_before:.4f}", f"{demo.eval_loss_after:.4f}")
    table.add_row("exact answers (64 unseen words)", f"{demo.accuracy_before:.0%}", f"{demo.accuracy_after:.0%}")
    console.print(table)
    samples = Table(title="greedy generations")
    for column in ("prompt", "expected", "before", "after") + (("merged fp16",) if demo.merged_dir else ()):
        samples.add_column(column)
    for s in demo.samples:
        ok = "green" if s.after == s.expected else "red"
        shown = [a if a else "[dim](nothing)[/]" for a in (s.before, s.after, s.merged or "")]
        row = [s.prompt, s.expected, shown[0], f"[{ok}]{shown[1]}[/]"] + ([shown[2]] if demo.merged_dir else [])
        samples.add_row(*row)
    console.print(samples)
    if demo.merged_dir:
        console.print(f"merged fp16 model: {demo.merged_dir} (loads with AutoModelForCausalLM.from_pretrained)")
    elif demo.merge_note:
        console.print(f"[dim]{demo.merge_note}[/]")
    console.print(f"done in {demo.seconds:.0f} s; base model, data and run are in {demo.out_dir}")
    return 0


# ------------------------------------------------------------------------------------------ main
COMMANDS = ("train", "export", "memory", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as one-line `UsageError`s (argparse prints usage and exits by itself)."""

    def error(self, message: str):
        import difflib
        import re

        from ..errors import UsageError

        choices = ", ".join(COMMANDS)
        bad = re.match(r"argument \{[^}]*\}: invalid choice: '([^']*)'", message)
        if bad:
            close = difflib.get_close_matches(bad.group(1), COMMANDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown command {bad.group(1)!r}{hint}; choose one of {choices}.")
        if message.startswith("the following arguments are required: {"):
            raise UsageError(f"no command given; run `{self.prog} COMMAND` with COMMAND one of {choices} (see --help).")
        raise UsageError(f"{message}; see `{self.prog} --help`.")


def build_parser() -> argparse.ArgumentParser:
    """The `qlora-lite` argument parser with every sub-command."""
    parser = _Parser(prog="qlora-lite", description="QLoRA fine-tuning on one constrained GPU.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    from . import memory

    for add in (_add_train, _add_export, memory.add_parser, _add_demo):
        add(sub)
    return parser


def _split_overrides(extra: list[str]) -> dict[str, str]:
    """Turn ['--lora.r', '8', '--train.lr=1e-4'] into {'lora.r': '8', 'train.lr': '1e-4'}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) == 2:
            raise QloraLiteError(f"unexpected argument {token!r}; overrides look like --section.key value.")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            i += 1
            value = extra[i]
        else:
            raise QloraLiteError(f"override {token} has no value; write {token} VALUE.")
        overrides[key] = value
        i += 1
    return overrides


def _print_error(exc: BaseException | str) -> None:
    """`error: <message>` as one line on stderr (message text is not read as rich markup), plus the memory
    advice of an out-of-memory error."""
    from rich.text import Text

    from ..errors import OutOfMemoryError

    console = _console(stderr=True)
    console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), soft_wrap=True)
    if isinstance(exc, OutOfMemoryError) and exc.advice is not None:
        for line in exc.advice.lines():
            console.print(Text(line), soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `qlora-lite` and `python -m qlora_lite`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        extra = [e for e in extra if e != "--debug"]
        _quiet_libraries()
        handler: Callable = args.handler
        if extra and not getattr(args, "accepts_overrides", False):
            from ..errors import UsageError

            raise UsageError(f"unrecognized arguments: {' '.join(extra)}; see `qlora-lite {args.command} --help`.")
        return int(handler(args, _split_overrides(extra)) or 0)
    except QloraLiteError as exc:
        if debug:
            raise
        _print_error(exc)
        return exc.exit_code
    except OSError as exc:  # the file system refused a read or write the input checks could not foresee
        if debug:
            raise
        _print_error(f"{exc}; check that path, its permissions and the free disk space.")
        return 2
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
