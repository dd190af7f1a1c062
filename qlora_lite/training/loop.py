"""The QLoRA training loop: checkpointed forward, accumulation, schedule, eval, checkpoints, exact resume.

`train(config)` loads the quantized base, applies LoRA, tokenizes the data and runs `max_steps`
optimizer steps. It never prints: progress goes to a `Reporter` (cli passes a rich presenter) and
to `metrics.jsonl`. The checkpoint format is described at `save_checkpoint`.

Resume is exact on the CPU: a checkpoint holds everything the next step depends on (fp32 master
weights and AdamW state, the torch RNG states that drive dropout, the data position as (epoch, batch)
of a seed-determined order, the partial logging window), and the learning rate is a pure function
of the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..config.settings import TrainConfig, TrainSettings, load_config
from ..data.dataset import BatchOrder, DatasetStats, TokenizedDataset, collate, pad_id, prepare_data, target_count
from ..errors import ConfigError, DataError, TrainingError
from ..export.merge import save_adapter
from ..io.atomic import atomic_dir, atomic_file, file_sha256, remove_stale_temps, save_safetensors_atomic, write_json_atomic, write_text_atomic
from ..io.faults import fault_point
from ..io.lock import DirectoryLock
from ..model import loader
from ..model.loader import default_device
from ..model.lora import apply_lora, count_parameters
from .loss import DEFAULT_CHUNK_TOKENS, causal_lm_loss
from ..memory.oom import oom_fault_point, oom_message, out_of_memory_error
from .optim import AdapterOptimizer

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
# Settings a resumed run must share with the checkpoint (the rest, e.g. max_steps or save_every, may change).
RESUME_KEYS = (
    "model", "quant", "lora", "data.train", "data.eval", "data.eval_fraction", "data.max_seq_len",
    "data.truncation", "data.packing", "train.micro_batch_size", "train.grad_accum", "train.optimizer", "train.seed",
)
# Fault injection for the crash tests (io.faults.KILL_ENV / ENOSPC_ENV): "in-checkpoint:N", "after-checkpoint:N"
# and "in-final-adapter:N" (N = step) SIGKILL the process there or fail there with ENOSPC. KILL_ENV is imported
# above so the tests keep finding it here.


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    eval_perplexity: float | None
    resumed_from: int | None
    tokens: int
    seconds: float
    data: DatasetStats
    eval_data: DatasetStats | None
    trainable_params: int
    total_params: int
    history: list[dict] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # what resume found and did (skipped checkpoints, leftovers)


class Reporter:
    """Receives training events; this base ignores them. cli passes a subclass that renders progress."""

    def on_start(self, info: dict) -> None:
        """Run facts before the first step: steps, data statistics, parameter counts, device, resume step, and
        `notices`: what resume found and did (checkpoints skipped as incomplete or corrupted, leftovers removed)."""

    def on_step(self, record: dict) -> None:
        """After every optimizer step: step, loss, lr, grad_norm, tokens_per_s, epoch (and mem_gib on CUDA)."""

    def on_eval(self, record: dict) -> None:
        """After an eval pass: step, eval_loss, eval_ppl."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a checkpoint directory is complete."""

    def on_end(self, result: TrainResult) -> None:
        """After the final adapter is written."""


# ------------------------------------------------------------------------------------- schedule
def lr_at(step: int, s: TrainSettings) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup to `lr`, then cosine to 0 or constant.

    The cosine is evaluated at (step - warmup - 1) / (max_steps - warmup), so no step runs at lr 0.
    """
    if s.warmup_steps and step <= s.warmup_steps:
        return s.lr * step / s.warmup_steps
    if s.schedule == "constant":
        return s.lr
    progress = (step - s.warmup_steps - 1) / max(1, s.max_steps - s.warmup_steps)
    return s.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------ model bits
def enable_gradient_checkpointing(model: torch.nn.Module, offload: bool = False) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so gradients reach the adapters of a frozen base).

    With `offload`, the one tensor each checkpointed layer keeps (its input) is held in pinned CPU memory
    (`torch.autograd.graph.save_on_cpu`) and copied back for the recompute: it frees layers x tokens x hidden
    bf16 bytes of GPU memory, which dominates at long sequences, for a copy each way per layer.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; set train.gradient_checkpointing: false.")
    from torch.utils.checkpoint import checkpoint

    def checkpoint_layer(function, *args, **kwargs):
        kwargs.setdefault("use_reentrant", False)
        if not offload:
            return checkpoint(function, *args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(function, *args, **kwargs)

    # transformers' own enable() picks the checkpoint function; set ours on every layer the same way it does
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint_layer)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast where the device has it (CUDA with bf16 support, or the CPU); otherwise a no-op."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward_loss_sum(
    model, batch: dict, device: torch.device, bf16: bool, loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    normalizer: float = 1.0,
) -> torch.Tensor:
    """fp32 next-token cross-entropy of one micro-batch summed over targets and divided by `normalizer`.

    With `loss_chunk_tokens` > 0, `lm_head` + cross-entropy run chunk by chunk (`loss.causal_lm_loss`) and the
    full-vocabulary logits never exist; 0 computes transformers' full logits first. The normalizer is applied
    inside, to the fp32 logit gradients, so no bf16-rounded scale multiplies the gradient afterwards.
    """
    with autocast_context(device, bf16):
        return causal_lm_loss(
            model,
            batch["input_ids"].to(device),
            batch["labels"].to(device),
            batch["attention_mask"].to(device),
            chunk_size=loss_chunk_tokens,
            normalizer=normalizer,
        )


def accumulate_gradients(
    model, batches: list[dict], optimizer: AdapterOptimizer, device: torch.device, bf16: bool = True,
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> float:
    """Forward and backward each micro-batch; leave fp32 gradients on the optimizer's masters; return the step loss.

    Each micro-batch's summed loss is divided by the step's total target count, so the accumulated gradient
    is exactly that of one token-weighted mean over all micro-batches, whatever their sizes.
    """
    targets = sum(target_count(b["labels"]) for b in batches)
    step_loss = torch.zeros((), dtype=torch.float32, device=device)
    for batch in batches:
        loss = _forward_loss_sum(model, batch, device, bf16, loss_chunk_tokens, normalizer=float(targets))
        loss.backward()
        optimizer.accumulate_grads()
        step_loss += loss.detach()
    return float(step_loss)


@torch.no_grad()
def evaluate(
    model, dataset: TokenizedDataset, batch_size: int, pad_token_id: int, device: torch.device, bf16: bool = True,
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[float, int]:
    """(token-weighted mean loss, number of target tokens) over a dataset, in order, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate(dataset.examples[start : start + batch_size], pad_token_id)
            total += float(_forward_loss_sum(model, batch, device, bf16, loss_chunk_tokens))
            count += target_count(batch["labels"])
    finally:
        model.train(was_training)
    return total / max(count, 1), count


# ---------------------------------------------------------------------------------- checkpoints
def _fault_point(point: str, step: int) -> None:
    fault_point(point, step)


def _fingerprint(config: TrainConfig) -> dict:
    flat = {}
    data = config.to_dict()
    for key in RESUME_KEYS:
        node = data
        for part in key.split("."):
            node = node[part]
        if isinstance(node, dict):
            flat.update({f"{key}.{sub}": value for sub, value in node.items()})
        else:
            flat[key] = node
    return flat


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (named step-N and holding the completion marker), oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run dir, or None."""
    found = checkpoint_dirs(output_dir)
    return found[-1][1] if found else None


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return tensors


def save_checkpoint(root: Path, step: int, model, optimizer: AdapterOptimizer, trainer_state: dict) -> Path:
    """Write checkpoints/step-N atomically: built in a temporary dir, the marker written last, then renamed.

    Contents: adapter/ (PEFT format), optimizer.pt (fp32 masters + inner AdamW state, tensors only),
    rng.safetensors (torch CPU/CUDA generator states), trainer_state.json (step, data position,
    schedule, logging window, settings fingerprint), COMPLETE.
    """
    final = root / f"step-{step}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter")
        with atomic_file(tmp / "optimizer.pt") as f:
            torch.save(optimizer.state_dict(), f)
        save_safetensors_atomic(_rng_tensors(), tmp / "rng.safetensors")
        write_json_atomic(tmp / "trainer_state.json", trainer_state)
        _fault_point("in-checkpoint", step)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        # sizes and digests let resume tell a complete checkpoint from one whose files were damaged after the fact
        checksums = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)} for name in files}
        write_json_atomic(tmp / COMPLETE_MARKER, {"step": step, "files": files, "checksums": checksums})
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from (no marker, a listed file missing, truncated or
    changed since it was written), or None when every file matches the size and sha256 its marker records."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker"
    try:
        record = json.loads(marker.read_text())
        listed = [str(name) for name in record["files"]]
        checksums = record.get("checksums") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"unreadable {COMPLETE_MARKER} marker"
    for name in listed:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        expected = checksums.get(name)
        if expected is None:
            continue  # a checkpoint from before checksums were recorded: presence is all that can be checked
        size = file.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes where {COMPLETE_MARKER} records {expected.get('bytes')}"
        if file_sha256(file) != expected.get("sha256"):
            return f"the sha256 of {name} differs from the one {COMPLETE_MARKER} records"
    return None


def restore_checkpoint(path: Path, optimizer: AdapterOptimizer, device: torch.device) -> dict:
    """Load optimizer (and with it the adapter weights) and RNG states from a checkpoint; return its trainer state."""
    from ..io.safetensors import SafetensorsFile

    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(f"checkpoint {path} cannot be resumed from ({problem}); delete it and resume from an older one.")
    state = json.loads((path / "trainer_state.json").read_text())
    saved = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(saved)
    rng = SafetensorsFile(path / "rng.safetensors")
    torch.set_rng_state(rng.read("cpu"))
    cuda_states = [rng.read(k) for k in sorted(k for k in rng.keys() if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    for _, path in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes `checkpoint_problem`, and one notice for each thing skipped or removed.

    Leftovers of killed writes (`.step-N.*.tmp` dirs, step-N dirs without the marker, a half-written final
    adapter) and checkpoints whose files do not match their marker are deleted, so pruning never counts them
    as kept checkpoints. Only checkpoints newer than the chosen one are checksummed.
    """
    notices: list[str] = []
    root = output_dir / "checkpoints"
    steps = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        half_written = re.match(r"^\.step-(\d+)\..+\.tmp$", path.name)
        match = CHECKPOINT_PATTERN.match(path.name)
        if path.is_dir() and half_written:
            notices.append(f"skipped incomplete checkpoint step-{half_written.group(1)} (no {COMPLETE_MARKER} marker, "
                           "its write was interrupted) and removed it")
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and match:
            steps.append((int(match.group(1)), path))
    chosen = None
    for step, path in sorted(steps, reverse=True):
        marked = (path / COMPLETE_MARKER).is_file()
        if marked and chosen is not None:
            continue
        problem = checkpoint_problem(path) if marked else f"no {COMPLETE_MARKER} marker"
        if problem is None:
            chosen = path
            continue
        notices.append(f"skipped {'corrupted' if marked else 'incomplete'} checkpoint step-{step} ({problem}) and removed it")
        shutil.rmtree(path, ignore_errors=True)
    for leftover in remove_stale_temps(output_dir / "adapter"):
        notices.append(f"removed {leftover.name}, left by an interrupted write of the final adapter")
    for name in ("metrics.jsonl", "config.yaml"):
        remove_stale_temps(output_dir / name)
    if chosen is None:
        notices.append(f"found no complete checkpoint in {root}, so training starts from step 0")
    return chosen, notices


# -------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended with one write per line.

    A kill can leave a torn last line; `truncate_to(step)` (run on resume) rewrites the file atomically
    with only the complete lines up to the checkpoint's step, so a resumed log equals an uninterrupted one.
    """

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        """Every complete line as a dict."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

    def truncate_to(self, step: int) -> None:
        """Keep only lines with `step` <= the given step."""
        rows = [r for r in self.read() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def append(self, record: dict) -> None:
        """Add one line."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------- train
def _as_config(config: TrainConfig | str | Path) -> TrainConfig:
    if isinstance(config, TrainConfig):
        config.validate()
        return config
    return load_config(config)


def _check_output_dir(out: Path, resume: bool) -> None:
    if resume:
        return
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) or (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a training run; pass --resume (resume=True) to continue it or choose another output_dir.")


def _check_resume_settings(state: dict, config: TrainConfig, path: Path) -> None:
    saved, now = state.get("fingerprint", {}), _fingerprint(config)
    for key in now:
        if key in saved and saved[key] != now[key]:
            raise ConfigError(
                f"checkpoint {path} was made with {key}={saved[key]!r} but this config has {key}={now[key]!r}; "
                "resume with the checkpoint's settings or start a new output_dir."
            )


def _prepare(config: TrainConfig, device: torch.device):
    """Tokenizer, datasets, the quantized model with LoRA (and checkpointing), and the adapter optimizer.

    Tokenizer, context length and data come first, so bad data fails in seconds, before a large base loads.
    """
    s = config.train
    model_dir = loader.check_model_dir(config.model)
    model_config = loader.load_config(model_dir, config.trust_remote_code)  # before the tokenizer, which reads it too
    tokenizer = loader.load_tokenizer_from(model_dir, config.trust_remote_code)
    if tokenizer is None:
        raise DataError(f"the model directory {model_dir} has no tokenizer files; copy the tokenizer next to config.json.")
    context = getattr(getattr(model_config, "get_text_config", lambda: model_config)(), "max_position_embeddings", None)
    if context and config.data.max_seq_len > context:
        raise ConfigError(
            f"data.max_seq_len is {config.data.max_seq_len}, longer than the model's context of {context} tokens; "
            f"set data.max_seq_len <= {context}."
        )
    train_ds, eval_ds = prepare_data(config.data, tokenizer, s.seed)
    q = config.quant
    model, _ = loader.load_quantized(
        model_dir, q.bits, q.quant_type, q.double_quant, device, config.lora.target_modules, blocksize=q.blocksize,
        int8_threshold=q.int8_threshold, trust_remote_code=config.trust_remote_code, load_tokenizer=False,
    )
    lc = config.lora
    apply_lora(model, lc.r, lc.alpha, lc.dropout, lc.target_modules, rslora=lc.rslora,
               adapter_dtype=getattr(torch, lc.adapter_dtype), seed=s.seed)
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=s.offload_activations)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdapterOptimizer(params, s.optimizer, lr=s.lr, weight_decay=s.weight_decay)
    return tokenizer, train_ds, eval_ds, model, optimizer


def train(config: TrainConfig | str | Path, *, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Fine-tune with QLoRA as the config says; `config` is a `TrainConfig` or a YAML path.

    With `resume`, continue from the newest complete checkpoint in `output_dir` (a fresh start if there
    is none). Raises `ConfigError` / `DataError` for bad settings or data, and `TrainingError` when the
    loss or the gradient norm stops being finite (the last good checkpoint is kept).
    """
    config = _as_config(config)
    # One process per run dir: a second `train` on it would interleave checkpoints and metrics.
    with DirectoryLock(config.output_dir, purpose="qlora-lite train"):
        try:
            return _train_locked(config, resume, reporter or Reporter())
        except torch.OutOfMemoryError as exc:
            failure = oom_message(exc)  # only the text: the traceback holds the failed step's tensors
    # Raised outside the handler, so those tensors are freed before anything else runs.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise out_of_memory_error(config, failure, default_device(), latest_checkpoint(config.output_dir))


def _write_failed(what: str, out: Path, exc: OSError, last_good: Path | None) -> TrainingError:
    """A failed write (disk full, permissions) as one sentence; atomic writes left the previous files intact."""
    where = f"the last complete checkpoint is {last_good}" if last_good else "no checkpoint had been written yet"
    return TrainingError(
        f"writing {what} in {out} failed ({exc}); nothing partial was kept and {where}; "
        "free disk space or fix permissions, then run again with --resume."
    )


def _train_locked(config: TrainConfig, resume: bool, reporter: Reporter) -> TrainResult:
    s = config.train
    out = Path(config.output_dir)
    _check_output_dir(out, resume)
    device = default_device()
    torch.manual_seed(s.seed)

    tokenizer, train_ds, eval_ds, model, optimizer = _prepare(config, device)
    order = BatchOrder(len(train_ds), s.micro_batch_size, s.seed)
    metrics = MetricsLog(out / "metrics.jsonl")
    pad = pad_id(tokenizer)

    step, window_sum, window_steps, tokens_total, resumed_from = 0, 0.0, 0, 0, None
    start_from, notices = find_resume_checkpoint(out) if resume else (None, [])
    if start_from is not None:
        state = json.loads((start_from / "trainer_state.json").read_text())
        _check_resume_settings(state, config, start_from)
        state = restore_checkpoint(start_from, optimizer, device)
        step = resumed_from = state["step"]
        pos = state["data"]
        order = BatchOrder(len(train_ds), s.micro_batch_size, s.seed, pos["epoch"], pos["index"])
        window_sum, window_steps, tokens_total = state["window_loss_sum"], state["window_steps"], state["tokens"]
        metrics.truncate_to(step)
    elif resume and metrics.path.exists():
        metrics.truncate_to(0)  # killed before its first checkpoint: start the log over with the run
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    trainable, total = count_parameters(model)
    reporter.on_start({
        "max_steps": s.max_steps, "start_step": step, "resumed_from": resumed_from, "device": str(device),
        "optimizer": optimizer.name, "train": train_ds.stats, "eval": eval_ds.stats if eval_ds else None,
        "trainable_params": trainable, "total_params": total, "output_dir": str(out), "notices": notices,
    })

    last_good = start_from
    last_train_loss = last_eval = None
    started = time.perf_counter()
    model.train()
    while step < s.max_steps:
        step += 1
        t0 = time.perf_counter()
        lr = lr_at(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [collate([train_ds.examples[i] for i in order.next_indices()], pad) for _ in range(s.grad_accum)]
        loss_value = accumulate_gradients(model, batches, optimizer, device, s.bf16, s.loss_chunk_tokens)
        oom_fault_point(step)
        grad_norm = optimizer.clip_grad_norm_(s.max_grad_norm) if math.isfinite(loss_value) else float("nan")
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint had been written yet"
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {grad_norm}"
            raise TrainingError(
                f"step {step}: the {what}, so training stopped before applying this step; {where} "
                "(lower train.lr, check the data, then run again with --resume)."
            )
        optimizer.step()
        optimizer.zero_grad()
        step_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        tokens_total += step_tokens
        seconds = time.perf_counter() - t0
        window_sum += loss_value
        window_steps += 1
        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": step_tokens / max(seconds, 1e-9), "epoch": round(order.epochs_done, 4)}
        if device.type == "cuda":
            record["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        reporter.on_step(record)
        if step % s.log_every == 0 or step == s.max_steps:
            last_train_loss = window_sum / window_steps
            metrics.append({"step": step, "loss": last_train_loss, "lr": lr, "grad_norm": grad_norm,
                            "tokens": tokens_total, "epoch": record["epoch"], "tokens_per_s": round(record["tokens_per_s"], 1)})
            window_sum, window_steps = 0.0, 0
        if eval_ds is not None and ((s.eval_every and step % s.eval_every == 0) or step == s.max_steps):
            eval_loss, _ = evaluate(model, eval_ds, s.micro_batch_size, pad, device, s.bf16, s.loss_chunk_tokens)
            last_eval = {"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 80.0))}
            metrics.append(last_eval)
            reporter.on_eval(last_eval)
        if (s.save_every and step % s.save_every == 0) or step == s.max_steps:
            trainer_state = {
                "step": step, "data": order.state(), "schedule": {"name": s.schedule, "lr": s.lr, "warmup_steps": s.warmup_steps, "max_steps": s.max_steps},
                "window_loss_sum": window_sum, "window_steps": window_steps, "tokens": tokens_total,
                "fingerprint": _fingerprint(config),
            }
            try:
                last_good = save_checkpoint(out / "checkpoints", step, model, optimizer, trainer_state)
            except OSError as exc:
                raise _write_failed(f"checkpoint step-{step}", out, exc, last_good) from None
            _prune_checkpoints(out, s.keep_checkpoints)
            reporter.on_checkpoint(step, last_good)
            _fault_point("after-checkpoint", step)

    if eval_ds is not None and last_eval is None:  # resumed at max_steps: report the final adapter's eval
        eval_loss, _ = evaluate(model, eval_ds, s.micro_batch_size, pad, device, s.bf16, s.loss_chunk_tokens)
        last_eval = {"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 80.0))}
    try:
        with atomic_dir(out / "adapter", overwrite=True) as tmp:  # old adapter/ or new, never a partial one
            save_adapter(model, tmp)
            _fault_point("in-final-adapter", step)
    except OSError as exc:
        raise _write_failed("the final adapter", out, exc, last_good) from None
    history = metrics.read()
    if last_train_loss is None:
        last_train_loss = next((r["loss"] for r in reversed(history) if "loss" in r), None)
    result = TrainResult(
        output_dir=out, adapter_dir=out / "adapter", steps=step, train_loss=last_train_loss,
        eval_loss=last_eval["eval_loss"] if last_eval else None, eval_perplexity=last_eval["eval_ppl"] if last_eval else None,
        resumed_from=resumed_from, tokens=tokens_total, seconds=time.perf_counter() - started,
        data=train_ds.stats, eval_data=eval_ds.stats if eval_ds else None, trainable_params=trainable, total_params=total,
        history=history, notices=notices,
    )
    reporter.on_end(result)
    return result

