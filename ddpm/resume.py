"""Never lose a run: atomic checkpoint files, finding the checkpoint to resume from, saving on
preemption signals, every RNG in every checkpoint, stopping before a diverged state is saved,
and checking the output directory before a run starts.

Lightning does the resuming itself (model, EMA, optimizer, LR schedule, counters, callbacks and,
through ResumableLoader, the data position); what is written here is what it lacks:
- `AtomicCheckpointIO`: Lightning writes a checkpoint straight into its final path, so a kill
  or a full disk mid-write leaves a truncated file where a good one was;
- `find_checkpoint`: the newest checkpoint of a run directory that actually loads, skipping
  corrupt or truncated ones by name;
- `Preemption`: Lightning stops on SIGTERM only at the end of an epoch and saves nothing, and
  its SLURM handler saves from inside the signal handler, possibly mid-step; this saves at the
  end of the current step, then requeues on SLURM and exits;
- `RNGCapture`: Lightning saves no RNG state, so a resumed run would draw other t and ε;
- `NonFiniteGuard`: a NaN loss or gradient stops the run (or skips the update) before any
  checkpoint holds the diverged weights.
Both are the DiffusionModule's own callbacks (`configure_callbacks`), so no config drops them.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.experimental.callback import Callback
from lightning.pytorch import callbacks
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig
from torch import Tensor

from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.files import move_aside

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
            target = move_aside(bad)
            log.warning("renamed %s to %s", bad.name, target.name)
        return path, ckpt
    return None


def resume_from(resume: str | None, out: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from, and its contents: resume=auto the newest one of this
    run directory that loads (none: a fresh start), resume=PATH that file, resume=null none
    (refused when the directory already holds checkpoints, which a fresh run would overwrite)."""
    existing = checkpoint_files(out)
    if resume is None or str(resume).lower() in ("null", "none", "never", "false"):
        if existing:
            raise FileExistsError(
                f"the run directory {out} already holds checkpoints ({existing[0].name}, ...), "
                "which a fresh run would overwrite: resume=auto continues that run; a new "
                "hydra.run.dir starts another"
            )
        return None
    if str(resume) == "auto":
        found = find_checkpoint(out)
        if found is None and existing:
            raise CheckpointError(
                f"none of the {len(existing)} checkpoints in {out} loads (see the warnings "
                "above); give one with resume=PATH, or a new hydra.run.dir to start afresh"
            )
        return found
    # a missing, corrupt or unsafe file: a clear error, now
    return Path(resume), load_checkpoint(resume)


def check_same_network(path: Path, ckpt: dict[str, Any], net: dict) -> None:
    """A checkpoint of another architecture, named with what differs (Lightning would fail
    later with a long list of mismatched tensor shapes)."""
    saved = (ckpt.get("hyper_parameters") or {}).get("net")
    if saved is None or saved == net:
        return
    diff = ", ".join(
        f"{k} {saved.get(k)!r} (this run's {net.get(k)!r})"
        for k in sorted(set(saved) | set(net))
        if saved.get(k) != net.get(k)
    )
    raise CheckpointError(
        f"{path} was trained with another network: {diff}. Resume with the same model "
        "settings (model.<key>=<value>), or start a new run directory (hydra.run.dir=DIR)"
    )


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


def rng_state() -> dict[str, Any]:
    """Every RNG that training draws from, as plain data (tensors, ints) for weights_only."""
    numpy = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy[0], torch.from_numpy(numpy[1].astype(np.int64)), *numpy[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGCapture(L.Callback):
    """Every rank's RNG states in each checkpoint (`rng_states`), set again right before the
    first batch of the resumed run, so it draws the t and ε the uninterrupted run would have.
    Restoring in on_train_start, not on load: whatever draws from the RNGs while Lightning sets
    up (after the load) must not shift the streams."""

    def __init__(self) -> None:
        self._to_restore: tuple[list | None, int] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, module: Any, checkpoint: dict) -> None:
        states = [rng_state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, rng_state())
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer: L.Trainer, module: Any, checkpoint: dict) -> None:
        self._to_restore = (checkpoint.get("rng_states"), checkpoint.get("global_step", 0))

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        states, step = self._to_restore or (None, 0)
        self._to_restore = None
        if not states:
            return
        rank = trainer.global_rank
        if rank < len(states):
            set_rng_state(states[rank])
        else:  # more ranks than saved: a distinct, reproducible stream per new rank
            torch.manual_seed(int(step) * 1_000_003 + rank)


class DivergenceError(FloatingPointError):
    """The loss or a gradient stopped being finite."""


class NonFiniteGuard(L.Callback):
    """What a non-finite loss or gradient does (`module.nonfinite`).

    "stop": raise DivergenceError naming the first bad step; checked every `check_every` steps
    without a device sync in between, and always before a checkpoint is written, so none holds
    a diverged state. "skip": drop the optimizer step (all its gradients; under gradient
    accumulation the whole accumulated step) and go on, one device sync per step, until
    `max_skips` steps in a row were dropped. Under fp16 the GradScaler drops steps with
    non-finite gradients itself; a non-finite loss is still counted here.
    """

    def __init__(self, mode: str = "stop", check_every: int = 1, max_skips: int = 100) -> None:
        self.mode, self.check_every, self.max_skips = mode, check_every, max_skips
        self.first_bad: Tensor | None = None  # step of the first non-finite loss/grad, or -1
        self.loss_finite: Tensor | None = None  # this step's loss (skip mode)
        self.skipped_steps = 0
        self.skips_in_a_row = 0

    def note(self, finite: Tensor, step: int) -> None:
        """Remember the first step at which `finite` was False, on the device (no sync)."""
        if self.first_bad is None or self.first_bad.device != finite.device:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        first = (~finite) & (self.first_bad < 0)
        self.first_bad = torch.where(first, step, self.first_bad)

    def check(self) -> None:
        """Raise DivergenceError if a non-finite loss or gradient was seen (one device sync)."""
        if self.first_bad is None or self.mode != "stop":
            return
        step = int(self.first_bad)
        if step >= 0:
            raise DivergenceError(
                f"the loss or a gradient became non-finite at step {step}: training stopped and "
                "no checkpoint was written after it, so the last good one is intact. Rerun to "
                "resume from it with a smaller trainer.gradient_clip_val or module.nonfinite=skip "
                "(which drops such updates), or start again with a lower module.optimizer.lr "
                "(a resumed run keeps the checkpoint's)"
            )

    def on_before_backward(self, trainer: L.Trainer, module: Any, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        if self.mode == "stop":
            # the step being computed is number global_step + 1 (checkpoint step_N follows it)
            self.note(finite, trainer.global_step + 1)
        else:  # every micro-batch of an accumulated step counts
            self.loss_finite = finite if self.loss_finite is None else self.loss_finite & finite

    def on_before_optimizer_step(self, trainer: L.Trainer, module: Any, optimizer: Any) -> None:
        loss_finite = True if self.loss_finite is None else bool(self.loss_finite)
        self.loss_finite = None
        precision = str(trainer.precision)
        fp16 = "16-mixed" in precision and "bf16" not in precision
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if fp16 or not grads:  # fp16's GradScaler finds and skips inf gradients itself
            finite = None
        else:
            finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()
        if self.mode == "stop":
            if finite is not None:
                self.note(finite, trainer.global_step + 1)
            return
        if loss_finite and (finite is None or bool(finite)):  # skip mode: one sync per step
            self.skips_in_a_row = 0
            return
        for p in params:
            p.grad = None  # the optimizer leaves parameters without a gradient alone
        self.skipped_steps += 1
        self.skips_in_a_row += 1
        what = "gradient" if loss_finite else "loss"
        log.warning("step %d: non-finite %s, update skipped", trainer.global_step + 1, what)
        if self.skips_in_a_row >= self.max_skips:
            raise DivergenceError(
                f"{self.skips_in_a_row} updates in a row had a non-finite {what} (at step "
                f"{trainer.global_step + 1}); the run has diverged: resume from an earlier "
                "checkpoint (resume=PATH) with a smaller trainer.gradient_clip_val, or start "
                "again with a lower module.optimizer.lr"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.global_step % self.check_every == 0:
            self.check()

    def on_save_checkpoint(self, trainer: L.Trainer, module: Any, checkpoint: dict) -> None:
        self.check()  # never write a diverged state over a good one
