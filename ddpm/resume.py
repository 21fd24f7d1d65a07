"""Never lose a run: atomic checkpoint files, finding the checkpoint to resume from, saving on
preemption signals, and checking the output directory before a run starts.

Lightning does the resuming itself (model, EMA, optimizer, LR schedule, counters, callbacks and,
through ResumableLoader, the data position); what is written here is what it lacks:
- `AtomicCheckpointIO`: Lightning writes a checkpoint straight into its final path, so a kill
  or a full disk mid-write leaves a truncated file where a good one was;
- `find_checkpoint`: the newest checkpoint of a run directory that actually loads, skipping
  corrupt or truncated ones by name;
- `Preemption`: Lightning stops on SIGTERM only at the end of an epoch and saves nothing, and
  its SLURM handler saves from inside the signal handler, possibly mid-step; this saves at the
  end of the current step, then requeues on SLURM and exits.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterable
from itertools import chain, count
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.experimental.callback import Callback
from lightning.pytorch import callbacks
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from ddpm.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs it, then renames it into
    place (atomic on POSIX): the file at `path` is always either the old or the new one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(path.parent, os.O_RDONLY)  # the rename itself, on disk
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(
                f"could not write checkpoint {path}: {e.strerror or e}. The checkpoints already "
                f"in {path.parent} are untouched; free disk space (or set paths.log_dir to "
                "another disk) and rerun the same command to resume from the last good one"
            ) from e


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus the state at the end of training: Lightning writes
    checkpoints only every `every_n_train_steps`, so a run whose max_steps (or max_time) falls
    between two of them would lose its last steps; here `last.ckpt` and a step file are
    written when training ends after the last periodic one."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step and trainer.global_step > 0:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints, newest first: checkpoints/*.ckpt and Lightning's SLURM
    hpc_ckpt_*.ckpt in the run directory."""
    run_dir = Path(run_dir)
    files = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def first_unused(candidates: Iterable[Path]) -> Path:
    """The first of `candidates` that doesn't exist: a name that overwrites nothing."""
    return next(path for path in candidates if not path.exists())


def find_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `run_dir` that loads, and its contents (loaded once: a resumed
    run reads it for checks before Lightning does). Corrupt ones newer than it are reported by
    name, skipped and renamed to <name>.corrupt: kept for a look, but out of the way of the
    resumed run (which would otherwise write its last.ckpt as last-v1.ckpt). When none loads,
    nothing is renamed."""
    corrupt = []
    for path in checkpoint_files(run_dir):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            corrupt.append(path)
            continue
        # under DDP every rank looks; only the first renames
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0:
            corrupt = []
        for bad in corrupt:
            names = chain([f"{bad.name}.corrupt"], (f"{bad.name}.corrupt{k}" for k in count(1)))
            target = first_unused(bad.with_name(name) for name in names)
            bad.rename(target)
            log.warning("renamed %s to %s", bad.name, target.name)
        return path, ckpt
    return None


def check_writable(directory: str | Path) -> None:
    """Fail at start, not hours later at the first save, when outputs can't be written."""
    directory = Path(directory)
    probe = directory / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"cannot write to the run directory {directory}: {e.strerror or e}. Choose a "
            "writable place with paths.log_dir=DIR (or hydra.run.dir=DIR)"
        ) from e


def check_creatable(directory: str | Path) -> None:
    """Whether `directory` exists as a writable folder or could be made, without making it."""
    directory = Path(directory).absolute()
    ancestor = directory
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is a file" if not ancestor.is_dir() else "is not writable"
        raise PermissionError(
            f"cannot write to the run directory {directory}: {ancestor} {what}. Choose a "
            "writable place with paths.log_dir=DIR (or hydra.run.dir=DIR)"
        )


class CheckRunDirectory(Callback):
    """A Hydra callback: an unusable run directory is one clear line, before Hydra's own
    attempt to create it fails with a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(directory: str) -> None:
        try:
            check_creatable(directory)
        except PermissionError as e:
            raise SystemExit(f"Error: {e}") from None


class Preempted(SystemExit):
    """Training stopped by a signal after saving a checkpoint; exit code 128 + signal."""


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1 (SLURM's warning before a time limit or preemption), finish the
    current step, save `<checkpoints>/last.ckpt`, requeue the job on SLURM (`scontrol requeue`,
    as Lightning's auto-requeue does), and exit with code 128 + signal.

    The rerun of the same command continues from that checkpoint (train.py's resume=auto);
    on SLURM the run directory is named after the job id, which a requeued job keeps.
    Under DDP the flag is agreed across ranks every step, since only some may get the signal.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.signals = [signal.Signals[s] for s in signals]
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own handlers (in Trainer._run), so these replace them
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: signals can't be caught here
                return

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exc: BaseException):
        self._restore()

    def _restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        received = self.received is not None
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        signum = self.received or signal.SIGTERM
        directory = Path(trainer.default_root_dir) / "checkpoints"
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            directory = Path(trainer.checkpoint_callback.dirpath)
        path = directory / "last.ckpt"
        trainer.save_checkpoint(path)
        message = (
            f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}; saved {path}"
        )
        job = _slurm_job_id()
        if self.requeue and job and trainer.is_global_zero:
            try:
                result = subprocess.run(
                    ["scontrol", "requeue", job], capture_output=True, text=True
                )
                outcome = "done" if result.returncode == 0 else f"failed ({result.stderr.strip()})"
            except FileNotFoundError:
                outcome = "failed (no scontrol on PATH)"
            message += f"; scontrol requeue {job}: {outcome}"
        else:
            message += "; rerun the same command to continue (resume=auto)"
        log.warning(message)
        self._restore()
        raise Preempted(128 + int(signum))


def _slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    )
    return job if job and re.fullmatch(r"[0-9_]+", job) else None
