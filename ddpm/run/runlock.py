"""One training run per run directory at a time.

Two `train.py` into the same `hydra.run.dir` (a second launch of a running job, a sweep rerun
while the first still runs) would interleave: both append to the logs, write `step_N` and
`step_N-v1`, and each records the other's checkpoints as its resume. The first process of a
run holds `<run dir>/.train.lock` (pid, host, process start time, SLURM job) until it exits;
a second one is refused in one line naming the holder. A lock whose process is gone (killed,
crashed, the machine rebooted) is stale and taken over with a warning: on the same host when
its pid is dead (or now a later process: another start time); from another host when it
names this same SLURM job (a requeued job, possibly on another node: SLURM never runs one
job twice at once), or when its holder, which touches it every HEARTBEAT_S seconds, has been
silent for STALE_AFTER_S. Only the first process of a DDP run locks: its children (ranks
1..) run the same job by design (`ddpm.run.launch.ddp_child_command`) and never look at it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
HEARTBEAT_S = 60  # the holder touches the lock this often
STALE_AFTER_S = 600  # a lock of another host untouched this long: its holder is gone


class RunLocked(OSError):
    """Another live process trains into this run directory."""


def first_process() -> bool:
    """Whether this is the first process of its run: not a DDP child (Lightning's launcher sets
    LOCAL_RANK / RANK for ranks 1..), not a later task of a SLURM or torchrun job, not the main
    process of a node other than the first."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key) not in (None, ""):  # Lightning's own order (rank_zero._get_rank)
            if int(os.environ[key]) != 0:
                return False
            break
    return int(os.environ.get("NODE_RANK") or 0) == 0


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), which
    tells a live holder from a later process that got the same pid; None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # after the command name, which may hold spaces


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process still runs (asked on its own host only)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that pid: alive
        pass
    started = holder.get("start")
    return started is None or _start_time(pid) in (None, started)


def _describe(holder: dict[str, Any]) -> str:
    since = holder.get("since")
    when = f", since {since}" if since else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{when}"


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's holder; None when it is gone (released meanwhile) or unreadable."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _create(path: Path, holder: dict[str, Any]) -> bool:
    """Write the lock with its content in one step: a temporary file hard-linked into place
    (link fails if the lock exists, and no reader ever sees it half written)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(holder) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then the content
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(holder) + "\n")
        return True
    finally:
        tmp.unlink(missing_ok=True)


def acquire(directory: str | Path) -> Path:
    """Take the run directory's lock for this process, or raise RunLocked naming its holder."""
    path = Path(directory) / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "job": _job_id(),
    }
    for _ in range(3):  # a stale lock removed, or one released meanwhile: try again
        if _create(path, me):
            return path
        holder = _read(path)
        if holder is None:
            continue
        if not holder:  # unreadable: a writer without hard links, killed before writing
            if time.time() - _mtime(path) < 10:
                time.sleep(0.5)
                continue
        elif _held(holder, path):
            raise _refusal(directory, path, holder)
        _take_over(path, holder)
    raise RunLocked(f"could not take the lock {path} of the run directory {directory}; rerun")


def _take_over(path: Path, stale: dict[str, Any]) -> None:
    """Remove the stale lock `stale` read from `path`, and only it: two launches after a crash
    both read the stale holder, and the slower must not delete the lock the faster has taken
    since. The lock is moved to a name of this process's own (rename is atomic) and read
    again there: the stale one is deleted, a fresh one put back."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # the other launch took it over first: try again to create
        return
    if _read(aside) == stale:
        log.warning("removed the stale lock %s of a run that ended (%s)", path, _describe(stale))
        aside.unlink(missing_ok=True)
        return
    # another launch's fresh lock: back in place (unless a third launch made one meanwhile)
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    aside.unlink(missing_ok=True)


def _job_id() -> str | None:
    """This process's SLURM job (array task) id, which a requeued job keeps; None elsewhere."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID") or None


def _held(holder: dict[str, Any], path: Path) -> bool:
    """Whether a lock's holder may still run (see the module's docstring)."""
    if holder.get("host") == socket.gethostname():
        return _alive(holder)
    if holder.get("job") and holder.get("job") == _job_id():
        return False
    return time.time() - _mtime(path) < STALE_AFTER_S


def _refusal(directory: str | Path, path: Path, holder: dict[str, Any]) -> RunLocked:
    return RunLocked(
        f"the run directory {directory} is in use by another training run "
        f"({_describe(holder)}; lock file {path}): wait for it to end, or give this one "
        "another hydra.run.dir. If that process is gone (its machine was lost), delete "
        "the lock file and rerun"
    )


def check_free(directory: str | Path) -> None:
    """Raise RunLocked if a live run holds `directory`, without taking the lock: Hydra's
    run-start check, before Hydra rewrites the directory's .hydra/ with this launch's config."""
    if not first_process():
        return
    path = Path(directory) / LOCK_NAME
    holder = _read(path)
    if holder and _held(holder, path):
        raise _refusal(directory, path, holder)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def release(path: Path) -> None:
    """Remove the lock if this process still holds it (never another's)."""
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def run_lock(directory: str | Path) -> Iterator[Path | None]:
    """Hold the run directory's lock for the block (released on any exit, exceptions and
    SystemExit included); a no-op in the other processes of a DDP run."""
    if not first_process():
        yield None
        return
    path = acquire(directory)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        release(path)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    """Touch the lock while its run lives: what tells another host that it still does."""
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:  # removed by hand, or the disk went away: nothing to keep alive
            return
