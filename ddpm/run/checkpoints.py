"""A run's checkpoint files: written atomically (`AtomicCheckpointIO`: Lightning writes into
the final path, so a kill or a full disk mid-write leaves a truncated file where a good one
was), kept last-K across kills and resumes (`ModelCheckpoint`), and found again
(`find_checkpoint`: the checkpoint of a run directory with the highest step that actually
loads, skipping corrupt or truncated ones by name; `remove_dead_writes` deletes the temporary
files of writes that were killed). Reading one safely is `ddpm.checkpoint.load_checkpoint`."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import callbacks
from lightning.pytorch.plugins.io import TorchCheckpointIO

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
