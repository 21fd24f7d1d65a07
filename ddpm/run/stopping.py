"""Stopping a run without losing it: on a preemption signal (SIGTERM, SIGUSR1 from SLURM)
`Preemption` saves at the end of the current step, requeues the job on SLURM and exits;
`Interrupt` does the same on Ctrl-C. Lightning stops on SIGTERM only at the end of an epoch and
saves nothing, and its SLURM handler saves from inside the signal handler, possibly mid-step."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer

log = logging.getLogger(__name__)


class LaunchTimer(Timer):
    """`trainer.max_time` for each launch of train.py. Lightning's own Timer restores the time
    earlier launches used from the checkpoint, so a run that max_time ended stopped again at
    its first step when run again: the very command the STOPPED EARLY warning gives to continue
    it trained nothing. Here every launch has the whole budget (its purpose: a last resort
    against one launch running too long), and the run continues as documented."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The elapsed time of earlier launches is not this launch's: nothing to restore."""


class Preempted(SystemExit):
    """Training stopped by a signal after saving a checkpoint; exit code 128 + signal."""


class Preemption(L.Callback):
    """On SIGTERM, SIGUSR1 (SLURM's warning before a time limit or preemption, with
    `sbatch --signal=USR1@120`) or SIGUSR2 (submitit's, or the one SUBMITIT_PREEMPT_SIGNAL
    names), finish the current step, save `<checkpoints>/last.ckpt`, requeue the job, and exit.

    Requeueing: in a job of hydra-submitit-launcher, submitit's own handler of its signal
    (replaced here while training) is called after the save: it resubmits the same Hydra job
    and requeues (`scontrol requeue` on SLURM, a restart under submitit_local), counting
    timeouts against max_num_timeout. Elsewhere on SLURM `scontrol requeue` is run here (as
    Lightning's auto-requeue does) and the process exits with code 128 + signal.

    The rerun of the same command continues from that checkpoint (train.py's resume=auto);
    on SLURM the run directory is named after the job id, which a requeued job keeps.
    Under DDP the flag is agreed across ranks every step, since only some may get the signal.
    """

    def __init__(
        self,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        requeue: bool = True,
    ):
        self.signals = [signal.Signals[s] for s in signals]
        submitit = os.environ.get("SUBMITIT_PREEMPT_SIGNAL")  # submitit's signal, if not USR2
        if submitit and f"SIG{submitit}" in signal.Signals.__members__:
            self.signals.append(signal.Signals[f"SIG{submitit}"])
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
        if not on_any_rank(trainer, self.received is not None):
            return
        signum = self.received or signal.SIGTERM
        path = save_and_log_step(trainer)
        message = (
            f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}; saved {path}"
        )
        submitit = _submitit_requeue(self._previous.get(signum))
        if self.requeue and submitit is not None:
            log.warning("%s; submitit requeues the job", message)
            self._restore()
            submitit(signum, None)  # exits (requeued), or raises when it may not requeue
            raise Preempted(128 + int(signum))  # a rank other than submitit's first task
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


def _submitit_requeue(handler: Any) -> Any:
    """submitit's handler of its preemption signal (which checkpoints the Hydra job and
    requeues it), if `handler` is that one; None for any other."""
    owner = getattr(handler, "__self__", None)
    if type(owner).__module__.startswith("submitit.") and handler.__name__ != "bypass":
        return handler
    return None


def _slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    )
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


class Interrupt(L.Callback):
    """Ctrl-C (SIGINT) saves like SIGTERM: the first press finishes the current step, saves
    `<checkpoints>/last.ckpt` and exits with code 130; a second press stops at once, unsaved.

    Lightning's own Ctrl-C handling raises KeyboardInterrupt wherever the run is (possibly in
    the middle of an optimizer step, half the weights updated), calls `on_exception`, closes
    the loggers and exits with code 1, saving nothing: a checkpoint taken in `on_exception`
    could hold such a half-made step. So the first press is only noted here, and acted on at
    the end of the step, as `Preemption` does for SIGTERM.

    The save and the step's log row are `save_and_log_step`, shared with `Preemption`.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning(
            "Ctrl-C: saving a checkpoint after this step (press Ctrl-C again to stop at once, "
            "without saving)"
        )
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second press

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:  # after Lightning's own handlers are in place (Trainer._run)
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: signals can't be caught here
            self._previous = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if not on_any_rank(trainer, self.pressed):
            return
        path = save_and_log_step(trainer)
        log.warning(
            "stopped by SIGINT at step %d (Ctrl-C); saved %s; rerun the same command to "
            "continue (resume=auto)",
            trainer.global_step,
            path,
        )
        self._restore()
        raise Preempted(128 + signal.SIGINT)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()


def on_any_rank(trainer: L.Trainer, flag: bool) -> bool:
    """Whether `flag` holds on any rank (a signal may reach only some of them): agreed every
    step, so that all ranks stop at the same one."""
    if trainer.world_size > 1:
        return trainer.strategy.reduce_boolean_decision(flag, all=False)
    return flag


def save_and_log_step(trainer: L.Trainer) -> Path:
    """A stop at the end of a step (`Preemption`, `Interrupt`): save `<checkpoints>/last.ckpt`,
    then send the step's metrics to the loggers. The stop is raised from on_train_batch_end,
    before Lightning logs the step, so metrics.csv would otherwise end one row short of the
    saved step."""
    directory = Path(trainer.default_root_dir) / "checkpoints"
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
        directory = Path(trainer.checkpoint_callback.dirpath)
    path = directory / "last.ckpt"
    trainer.save_checkpoint(path)
    try:  # what Lightning does right after on_train_batch_end (_TrainingEpochLoop)
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
    except Exception as e:  # the checkpoint is saved; a lost log row is no reason to fail
        log.warning("could not log the metrics of the last step: %s", e)
    return path
