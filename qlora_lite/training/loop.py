"""The QLoRA training loop: steps, logging, eval, checkpoints and exact resume.

`train(config)` prepares the run (`setup.prepare_run`), then repeats the one training step (`step.train_step`)
for the run's length (`train.max_steps`, or the steps `train.epochs` makes: `schedule.run_steps`), writing
`metrics.jsonl`, checkpoints (`checkpoint`), the trackers of `train.report_to` (`trackers`) and the final adapter.
Progress goes to a `Reporter`; with none given, `progress.display_for_python` shows the CLI's display on a
terminal or in a notebook.

Resume is exact on the CPU: a checkpoint holds everything the next step depends on (fp32 master weights and
AdamW state, the torch RNG states that drive dropout, the data position as (epoch, batch) of a seed-determined
order, the partial logging window), and the learning rate is a pure function of the step. A step's micro-batches
are collated one at a time, as the step uses them; only its target count is taken up front, from the labels.

On SIGTERM (through the CLI) or Ctrl-C, `train` raises `interrupt.Interrupted` naming the newest complete
checkpoint; atomic writes leave nothing half-written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..config.settings import TrainConfig
from ..io.lock import DirectoryLock
from ..memory.oom import oom_message, out_of_memory_error
from ..model.loader import default_device
from .arguments import as_config, check_call, check_output_parent
from .checkpoint import latest_checkpoint
from .distributed import World, device_for, run_on_main, start, stop, world_from_env
from .reporter import Reporter, TrainResult
from .run import Run
from .trackers import check_trackers

__all__ = ["Reporter", "TrainResult", "train"]


def train(
    config: TrainConfig | str | Path,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    allow_data_change: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune with QLoRA as the config says; `config` is a `TrainConfig` or a YAML path.

    With `resume`, continue from the newest complete checkpoint in `output_dir` (a fresh start if there
    is none); a data file that changed since that checkpoint is refused unless `allow_data_change`.
    Events go to `reporter`; with none, the CLI's progress display is shown when standard output is a terminal or
    a notebook (`progress=False`: never). `train.report_to` adds its trackers.
    Raises `ConfigError` / `DataError` for bad settings, arguments or data, `TrainingError` when the loss or
    the gradient norm stops being finite (the last good checkpoint is kept), and `interrupt.Interrupted` (a
    `KeyboardInterrupt`) on Ctrl-C, naming the checkpoint to resume from.

    Under torchrun (WORLD_SIZE > 1) every rank calls `train`: the process group starts here (NCCL on GPUs, gloo on
    CPUs), each rank takes its micro-batches of every step, and rank 0 alone writes the run directory and reports
    (the other ranks' `reporter` is not called).
    """
    check_call(resume, allow_data_change, reporter, progress)
    config = as_config(config)
    check_trackers(config.train.report_to)  # a missing package is said before anything loads
    check_output_parent(Path(config.output_dir))
    world = world_from_env()
    if not world.is_main:
        reporter, progress = None, False
    device = device_for(world) if world.distributed else default_device()
    started = start(world, device, config.train.collective_timeout)
    try:
        return _train(config, world, device, resume, reporter, allow_data_change, progress)
    finally:
        if started:  # a process group the caller started is the caller's
            stop()


def _train(
    config: TrainConfig,
    world: World,
    device: torch.device,
    resume: bool,
    reporter: Reporter | None,
    allow_data_change: bool,
    progress: bool,
) -> TrainResult:
    if reporter is None and progress:
        from .progress import display_for_python

        reporter = display_for_python()
        owned = [reporter] if reporter is not None else []
    else:
        owned = []  # the caller's reporter is the caller's to close
    # One process per run dir (rank 0 of a launch): a second `train` on it would interleave checkpoints and metrics.
    with contextlib.ExitStack() as locked:

        def take_lock() -> None:
            locked.enter_context(DirectoryLock(config.output_dir, purpose="qlora-lite train"))

        run_on_main(world, take_lock, "taking the run directory's lock")
        run = Run(config, reporter or Reporter(), owned, world=world, device=device)
        try:
            return run.run(resume, allow_data_change)
        except torch.OutOfMemoryError as exc:
            failure = oom_message(exc)  # only the text: the traceback holds the failed step's tensors
        except KeyboardInterrupt as exc:
            raise run.interrupted(exc) from None
        finally:
            run.close()
    # Raised outside the handler, so those tensors are freed before anything else runs.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise out_of_memory_error(config, failure, device, latest_checkpoint(config.output_dir))
