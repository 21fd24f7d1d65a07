"""Never lose a run: atomic checkpoint files, finding the checkpoint to resume from, saving on
preemption signals, every RNG in every checkpoint, stopping before a diverged state is saved,
and checking the output directory before a run starts.

Lightning does the resuming itself (model, EMA, optimizer, LR schedule, counters, callbacks and,
through ResumableLoader, the data position); what is written here is what it lacks:
- `AtomicCheckpointIO`: Lightning writes a checkpoint straight into its final path, so a kill
  or a full disk mid-write leaves a truncated file where a good one was;
- `find_checkpoint`: the checkpoint of a run directory with the highest step that actually
  loads, skipping corrupt or truncated ones by name (and `remove_dead_writes` deletes the
  temporary files of writes that were killed);
- `ModelCheckpoint`: keep-last-K that holds across kills and resumes;
- `Preemption`: Lightning stops on SIGTERM only at the end of an epoch and saves nothing, and
  its SLURM handler saves from inside the signal handler, possibly mid-step; this saves at the
  end of the current step, then requeues on SLURM and exits;
- `Interrupt`: Lightning saves nothing on Ctrl-C; this saves like `Preemption`;
- `RNGCapture`: Lightning saves no RNG state, so a resumed run would draw other t and ε;
- `NonFiniteGuard`: a NaN loss or gradient stops the run (or skips the update) before any
  checkpoint holds the diverged weights.
Both are the DiffusionModule's own callbacks (`configure_callbacks`), so no config drops them.
"""

from __future__ import annotations

import contextlib
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

from ddpm import unet
from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.files import move_aside, nearest_existing
from ddpm.runlock import RunLocked, check_free

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

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        """Lightning writes last-v1.ckpt, leaving last.ckpt stale where sample.py and users look,
        whenever a last.ckpt exists that its state doesn't name as its own: a run directory
        moved or copied (the state holds the old absolute path), a resume from a periodic
        checkpoint saved before the first last.ckpt, a symlink (save_last=link, or made by
        hand). Here last.ckpt of this callback's directory is always the newest state; a
        symlink there is removed first (never its target: the write would follow a dangling
        link out of the directory, and overwrite the file a live one names)."""
        if self.save_last is True and self.dirpath:
            path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
            if Path(path).parent.absolute() == Path(self.dirpath).absolute():
                if trainer.is_global_zero and os.path.islink(path):
                    os.unlink(path)
                self.last_model_path = path  # so Lightning neither versions nor deletes it
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # on every rank alike (the lists decide the collective saves); rank 0 deletes
        if self.save_top_k > 0 and self.dirpath:
            self._adopt_untracked(trainer)

    def _adopt_untracked(self, trainer: L.Trainer) -> None:
        """Keep-last-K across kills: a run killed between writing a new periodic checkpoint
        and deleting the one it replaces leaves that one on disk but in no checkpoint's list,
        so nothing would ever delete it; so would files of steps after the one resumed from
        (resume=PATH of an earlier one: the resumed run writes its own as step_N-v1). Here such
        files of this callback (each holds its own score) join the list again, and the ones
        beyond K are deleted, now or as newer ones are written."""
        tracked = {Path(f).resolve() for f in self.best_k_models}
        for path in sorted(Path(self.dirpath).glob(f"*{self.FILE_EXTENSION}")):
            if path.resolve() in tracked or path.name.startswith(self.CHECKPOINT_NAME_LAST):
                continue
            ckpt = _peek(path)
            state = ((ckpt or {}).get("callbacks") or {}).get(self.state_key) or {}
            score = state.get("current_score")
            if score is None:
                continue  # not one of this callback's: not ours to delete
            self.best_k_models[str(path)] = torch.as_tensor(score)
        trainer.strategy.barrier("ddpm_adopt_untracked")  # every rank has read before any delete
        scores = self.best_k_models
        best, worst = (min, max) if self.mode == "min" else (max, min)
        while len(scores) > self.save_top_k:
            path = worst(scores, key=scores.get)
            del scores[path]
            if Path(path).exists():
                log.info("keep-last-%d: removed %s, from before the resume", self.save_top_k, path)
            self._remove_checkpoint(trainer, path)  # on rank 0
        if scores:  # what Lightning's _update_best_and_save keeps alongside the list
            self.best_model_path = best(scores, key=scores.get)
            self.best_model_score = scores[self.best_model_path]
            if len(scores) == self.save_top_k:
                self.kth_best_model_path = worst(scores, key=scores.get)
                self.kth_value = scores[self.kth_best_model_path]

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        """Lightning never deletes the checkpoint a run resumed from, so every resume from a
        periodic checkpoint would leave one more than K behind; here one of this callback's
        own files in its directory goes when it falls out of the K, resumed from or not."""
        if previous == current or "://" in str(previous):  # remote: as Lightning does
            return super()._should_remove_checkpoint(trainer, previous, current)
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents


def _peek(path: Path) -> dict[str, Any] | None:
    """A checkpoint's contents without reading its tensors (mmap: only the pickled index is
    read, milliseconds even for a large model); None for a file that doesn't load."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, unsafe, not a torch zip file ...: load_checkpoint says which
        return None
    return ckpt if isinstance(ckpt, dict) else None


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint was saved at, read cheaply (`_peek`); None if unreadable."""
    step = (_peek(path) or {}).get("global_step")
    return step if isinstance(step, int) else None


def checkpoint_files(run_dir: str | Path, report: bool = True) -> list[Path]:
    """A run's checkpoints, newest first by the step saved in each (file times change when a
    run directory is copied), then by file time: checkpoints/*.ckpt and Lightning's SLURM
    hpc_ckpt_*.ckpt in the run directory. Files whose step can't be read come first, so that
    `find_checkpoint` names them and sets them aside. A symlink to a missing file (a
    save_last=link whose target was deleted) is left out, with a warning when `report`: it
    holds nothing to resume from, and the run's next last.ckpt replaces it."""
    run_dir = Path(run_dir)
    files = []
    for path in [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]:
        if path.is_symlink() and not path.exists():
            if report:
                log.warning(
                    "ignoring %s: a symlink to %s, which does not exist", path, os.readlink(path)
                )
            continue
        files.append(path)
    steps = {p: checkpoint_step(p) for p in files}

    def newest(p: Path) -> tuple:
        step = steps[p]
        return (step is None, -1 if step is None else step, p.stat().st_mtime_ns, p.name)

    return sorted(files, key=newest, reverse=True)


# the temporary files of AtomicCheckpointIO: .<name>.<8 hex>.tmp
_TEMPORARY = ".*.ckpt.*.tmp"


def remove_dead_writes(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files that checkpoint writes killed midway left behind (each as
    large as a checkpoint, and never read): at the start of a run in `run_dir`, before it
    writes any. Under DDP the first rank only."""
    if _rank() != 0:
        return []
    run_dir = Path(run_dir)
    dead = [*run_dir.glob(f"checkpoints/{_TEMPORARY}"), *run_dir.glob(_TEMPORARY)]
    for path in dead:
        path.unlink(missing_ok=True)
    if dead:
        names = ", ".join(p.name for p in dead)
        log.warning("removed %d unfinished checkpoint writes of a killed run: %s", len(dead), names)
    return dead


def _rank() -> int:
    """This process's DDP rank from the environment (0 outside DDP)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def first_unused(candidates: Iterable[Path]) -> Path:
    """The first of `candidates` that doesn't exist: a name that overwrites nothing."""
    return next(path for path in candidates if not path.exists())


def find_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `run_dir` (by step, `checkpoint_files`) that loads, and its
    contents (loaded once: a resumed run reads it for checks before Lightning does). Corrupt
    ones tried before it (unreadable ones come first) are reported by
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
        if _rank() != 0:
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
    existing = checkpoint_files(out, report=False)  # find_checkpoint reports
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
    path = Path(resume)
    if path.is_dir():
        # a file, not a directory: "continue that run" is hydra.run.dir=DIR, and which of its
        # checkpoints is the user's choice to name
        found = [*checkpoint_files(path), *sorted(path.glob("*.ckpt"), reverse=True)]
        steps = {p: checkpoint_step(p) for p in dict.fromkeys(found)}
        listed = ", ".join(
            f"{p} (step {step})" if step is not None else f"{p} (does not load)"
            for p, step in steps.items()
        )
        raise CheckpointError(
            f"resume={resume} is a directory; resume takes a .ckpt file"
            + (f", e.g. one of: {listed}" if listed else " (it holds none)")
            + f". To continue the run in that directory, use hydra.run.dir={resume} (resume=auto)"
        )
    ckpt = load_checkpoint(path)  # a missing, corrupt or unsafe file: a clear error, now
    check_not_another_run(path, out)
    return path, ckpt


# what a run writes into its directory (Hydra's own .hydra/ and log come before the run starts)
RUN_OUTPUTS = (
    "checkpoints",
    "run.json",
    "metrics.json",
    "loss_curve.png",
    "samples",
    "config.yaml",
)


def check_not_another_run(path: Path, out: Path) -> None:
    """resume=PATH of a checkpoint from elsewhere into a run directory that already holds a
    run: continuing would overwrite that run's results (metrics.json, loss_curve.png,
    samples/final.png, run.json) with those of another. A checkpoint inside `out` continues
    that run from an earlier step; a new directory starts a branch from the file."""
    out, path = out.resolve(), path.resolve()
    if out in path.parents:
        return
    held = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not held:
        return
    origin = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    raise CheckpointError(
        f"resume={path} is not a checkpoint of the run in {out}, which holds another run "
        f"({', '.join(held)}) that this one would overwrite. To continue the checkpoint's run: "
        f"hydra.run.dir={origin}; to continue the run in {out}: resume=auto; to start from the "
        "checkpoint in a directory of its own: a new hydra.run.dir (or copy the checkpoint "
        f"into {out / 'checkpoints'} to continue from it there)"
    )


NOT_COMPARED: Any = "<not compared>"  # a setting a check leaves out / a checkpoint lacks


def check_same_process(
    path: Path,
    ckpt: dict[str, Any],
    schedule: dict | None,
    objective: str | None,
    allow: bool,
    *,
    optimizer: Any = NOT_COMPARED,
    lr_scheduler: Any = NOT_COMPARED,
    dataset: Any = NOT_COMPARED,
) -> list[str]:
    """A resume with another noise schedule (T, type, βs) or objective would go on training
    the weights for another task, and one with another dataset on other data; another
    optimizer or learning-rate schedule would be silently overruled by the checkpoint's
    (Lightning restores their state, settings included, while run.json records the new ones).
    Each change is named and refused unless `resume_changes=allow` (then a warning, and the
    caller applies the new optimizer settings: `ApplyOptimizerSettings`). The checkpoint's own
    values are in its hyper_parameters (and `dataset`, `RecordDataset`); returns the changed
    keys. A schedule of None, or a setting left NOT_COMPARED, is not compared (an autoencoder
    has no schedule; a checkpoint from before a setting was kept has no record of it)."""
    saved = ckpt.get("hyper_parameters") or {}
    changes = []
    if schedule is not None:
        changes += _changes("schedule", saved.get("schedule", NOT_COMPARED), schedule)
    if objective is not None and "objective" in saved and saved["objective"] != objective:
        changes.append(("module.objective", repr(saved["objective"]), repr(objective)))
    changes += _changes("module.optimizer", saved.get("optimizer", NOT_COMPARED), optimizer)
    old = saved.get("lr_scheduler", NOT_COMPARED)
    changes += _changes("module.lr_scheduler", old, lr_scheduler)
    changes += _changes("dataset", ckpt.get("dataset", NOT_COMPARED), dataset)
    if not changes:
        return []
    listed = ", ".join(f"{key}={old} (this run: {new})" for key, old, new in changes)
    if allow:
        log.warning("resume_changes=allow: resuming %s with changed settings: %s", path, listed)
        return [key for key, _, _ in changes]
    raise CheckpointError(
        f"{path} was trained with {listed}. Resume with the checkpoint's values, or set "
        "resume_changes=allow to go on training it with the new ones (or start a new run: a "
        "new hydra.run.dir)"
    )


def _changes(prefix: str, old: Any, new: Any) -> list[tuple[str, str, str]]:
    """(key, old, new) for each setting of a config node that differs; another class
    (`_target_`, whose options differ too) is one change named by the group; nothing when the
    checkpoint has no record of it (saved before it was kept); None is "none" (constant LR)."""
    if NOT_COMPARED in (old, new) or old == new:
        return []
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [(prefix, repr(old), repr(new))]
    kinds = [str(c.get("_target_", "")).rsplit(".", 1)[-1] for c in (old, new)]
    if kinds[0] != kinds[1]:
        return [(prefix, *kinds)]
    return [
        (f"{prefix}.{key}", repr(old.get(key)), repr(new.get(key)))
        for key in sorted(set(old) | set(new))
        if _plain(old.get(key)) != _plain(new.get(key))
    ]


def _plain(value: Any) -> Any:
    """Lists and tuples alike (YAML gives lists, a saved config may hold tuples)."""
    return list(value) if isinstance(value, tuple | list) else value


class RecordDataset(L.Callback):
    """Keeps what identifies the training data (`dataset` in every checkpoint), so that a
    resume onto other data is named by `check_same_process`."""

    def __init__(self, dataset: dict[str, Any]) -> None:
        self.dataset = dataset

    def on_save_checkpoint(self, trainer: L.Trainer, module: Any, checkpoint: dict) -> None:
        checkpoint["dataset"] = self.dataset


class ApplyOptimizerSettings(L.Callback):
    """resume_changes=allow with another optimizer or LR schedule: Lightning restores the
    checkpoint's optimizer and scheduler state, settings included, so the new learning rate
    would be silently ignored. Right after that restore (on_train_start), every optimizer
    setting and the scheduler's state become those a run with the new settings would have at
    this step (a fresh scheduler stepped as often), keeping the optimizer's moments."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import warnings

        from lightning.pytorch.core.optimizer import _configure_optimizers

        fresh, schedulers, _ = _configure_optimizers(pl_module.configure_optimizers())
        for live, new in zip(trainer.lr_scheduler_configs, schedulers, strict=False):
            scheduler = new["scheduler"] if isinstance(new, dict) else new
            # the run's optimizer steps (the scheduler steps once each): a restored scheduler's
            # own count would be 0 where the checkpoint had none of this kind
            steps = trainer.global_step
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore")
                for _ in range(steps - int(getattr(scheduler, "last_epoch", 0))):
                    scheduler.step()  # sets the fresh optimizer's lr as it goes
            live.scheduler.load_state_dict(scheduler.state_dict())
        for live, new in zip(trainer.optimizers, fresh, strict=False):
            for group, new_group in zip(live.param_groups, new.param_groups, strict=False):
                group.update({k: v for k, v in new_group.items() if k != "params"})
        rates = [g["lr"] for o in trainer.optimizers for g in o.param_groups]
        log.info("resume_changes=allow: the new optimizer settings apply (lr now %s)", rates)


def _architecture(net: dict) -> dict:
    """A UNet config as the network it builds: attention by the sizes it reaches, whichever
    key chose them (attn_resolutions [7] and attn_levels [-1] are one network at 28 px, and a
    size that is no level's builds nothing). Other configs as they are."""
    if not isinstance(net, dict) or net.get("_target_") != "ddpm.unet.UNet":
        return net
    try:
        size, mult = net.get("image_size", 32), net.get("ch_mult", (1, 2, 2, 2))
        sizes = unet.attention_sizes(
            size, mult, net.get("attn_resolutions", (16,)), net.get("attn_levels")
        )
        levels = {size // 2**k for k in range(len(mult))}
    except (TypeError, ValueError):  # not a valid config: compared as written
        return net
    rest = {k: v for k, v in net.items() if k not in ("attn_resolutions", "attn_levels")}
    return {**rest, "attention": sorted(sizes & levels)}


def check_same_network(path: Path, ckpt: dict[str, Any], net: dict) -> None:
    """A checkpoint of another architecture, named with what differs (Lightning would fail
    later with a long list of mismatched tensor shapes)."""
    saved = (ckpt.get("hyper_parameters") or {}).get("net")
    if saved is None or saved == net or _architecture(saved) == _architecture(net):
        return
    was, now = _architecture(saved), _architecture(net)
    if "attention" in was and {k: v for k, v in was.items() if k != "attention"} == {
        k: v for k, v in now.items() if k != "attention"
    }:  # the same network but where it attends: say which override rebuilds the checkpoint's
        raise CheckpointError(
            f"{path} was trained with attention at {was['attention']} px, this run's network "
            f"attends at {now['attention']} px. Resume with model.attn_resolutions="
            f"{was['attention']} model.attn_levels=[] (the checkpoint's), or start a new run "
            "directory (hydra.run.dir=DIR)"
        )
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
    except OSError as e:
        # a full disk creates the file and then fails the write: never leave it behind
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise PermissionError(
            f"cannot write to the run directory {directory}: {e.strerror or e}. Choose a "
            "writable place with paths.log_dir=DIR (or hydra.run.dir=DIR)"
        ) from e
    probe.unlink(missing_ok=True)


def check_creatable(directory: str | Path) -> None:
    """Whether `directory` exists as a writable folder or could be made, without making it."""
    directory = Path(directory).absolute()
    ancestor = nearest_existing(directory)
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is a file" if not ancestor.is_dir() else "is not writable"
        raise PermissionError(
            f"cannot write to the run directory {directory}: {ancestor} {what}. Choose a "
            "writable place with paths.log_dir=DIR (or hydra.run.dir=DIR)"
        )


class CheckRunDirectory(Callback):
    """A Hydra callback: an unusable run directory, or one a live run holds
    (`ddpm.runlock`), is one clear line, before Hydra's own attempt to create it fails with a
    traceback, or rewrites the running job's .hydra/."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, run=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(directory: str, run: bool = False) -> None:
        try:
            check_creatable(directory)
            if run:  # a sweep's jobs are checked as each starts (training.train)
                check_free(directory)
        except (PermissionError, RunLocked) as e:
            raise SystemExit(f"Error: {e}") from None


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
