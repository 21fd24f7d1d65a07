"""Writing a file so that readers see the old one or the new one, never half of one (and a
full disk as one line naming the file); removing what killed writes left; the per-user cache
directory; and checking at start that an output place can be written at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import BinaryIO

try:  # POSIX: a live writer holds a lock on its temporary file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)


def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask (read once, at import)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


class DiskFull(OSError):
    """A write that found no space (ENOSPC, or the quota: EDQUOT), as one line naming the file
    and the space left where it goes."""

    def __init__(self, path: str | Path, code: int = errno.ENOSPC) -> None:
        super().__init__(code, os.strerror(code), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        free = free_bytes(self.path.parent)
        left = "" if free is None else f", {format_size(free)} free there"
        return f"cannot write {self.path}: {self.strerror}{left}; free space or write elsewhere"


FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(f)` into a temporary file of its own beside `path` (two writers never share one),
    then rename it into place (atomic on POSIX): a killed or racing writer never leaves a
    truncated `path`. The temporary file is removed if writing fails; one a killed writer left
    is found by `remove_dead_temps` (the writer holds a lock on it until the rename). A full
    disk raises `DiskFull`, naming `path`. The file gets the mode a plain open() would give it
    (mkstemp's are private, 0600: unreadable to a colleague)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno in FULL:
            raise DiskFull(path, e.errno) from None
        raise
    try:
        _lock(fd)
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.replace(tmp, path)  # before the close releases the lock
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in FULL:
            raise DiskFull(path, e.errno) from None
        raise
    return path


def _lock(fd: int) -> None:
    """Mark a temporary file as being written (`remove_dead_temps` leaves it alone); where
    the file system has no locks (some network mounts) it goes unmarked, and only its age
    protects it."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_dead_temps(folder: str | Path, min_age_s: float = 60.0) -> list[Path]:
    """Delete the temporary files (`.<name>.<random>.tmp`) that `atomic_write`s killed midway
    left in `folder`, never read and as large as what they held; logs which. A file a live
    writer holds locked is kept, and so is one younger than `min_age_s` (between mkstemp and
    the lock, a new one is not locked yet)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    dead = [p for p in sorted(folder.glob(".*.tmp")) if _is_dead_write(p, min_age_s)]
    for path in dead:
        path.unlink(missing_ok=True)
    if dead:
        log.warning(
            "removed %d unfinished writes of a killed run in %s: %s",
            len(dead),
            folder,
            ", ".join(p.name for p in dead),
        )
    return dead


def _is_dead_write(path: Path, min_age_s: float) -> bool:
    try:
        if not path.is_file() or time.time() - path.stat().st_mtime < min_age_s:
            return False
        if fcntl is None:
            return True
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed
    except BlockingIOError:  # a writer holds it: alive
        return False
    except OSError:  # gone meanwhile, or unreadable: not ours to judge
        return False
    return True


def user_cache_dir() -> Path:
    """The per-user cache of this project: `$XDG_CACHE_HOME/ddpm`, else `~/.cache/ddpm` (the
    XDG base-directory spec ignores a relative XDG_CACHE_HOME): converted Inception weights,
    rendered letters, reference statistics and latents, shared by every working directory."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "ddpm"


def cache_root(cache_dir: str | Path | None) -> Path:
    """The cache directory a `cache_dir=` option names; null (None or "") is `user_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir else user_cache_dir()


def free_bytes(directory: str | Path) -> int | None:
    """Bytes free for this user where `directory` (or its nearest existing ancestor) lies."""
    try:
        return shutil.disk_usage(nearest_existing(directory)).free
    except OSError:
        return None


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_free_space(path: str | Path, key: str, need: int, fix: str = "DIR") -> None:
    """Refuse, before any work, to write `path` (the option `key`) onto a disk with less than
    `need` bytes free: the work would be lost at the end."""
    free = free_bytes(Path(path).absolute().parent)
    if free is not None and free < need:
        raise OSError(
            f"{key}={path}: only {format_size(free)} free there, {format_size(need)} needed; "
            f"free some space or write elsewhere: {key}={fix}",
        )


def move_aside(path: str | Path) -> Path:
    """Rename a bad file to `<name>.corrupt` (or .corrupt1, .corrupt2 ... if taken), keeping it
    for a look instead of deleting it; returns where it went."""
    path = Path(path)
    for k in count():
        aside = path.with_name(f"{path.name}.corrupt{k or ''}")
        if not aside.exists():
            path.rename(aside)
            return aside
    raise AssertionError("unreachable")


def nearest_existing(path: str | Path) -> Path:
    """`path` (absolute) or its nearest ancestor that exists: where creating it would start."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(
    directory: str | Path, key: str, value: str | Path | None = None, fix: str = "DIR"
) -> None:
    """Refuse, before any work, an output directory that is a file or lies under one, or that
    cannot be written (read-only disk, no permission). The message names the option `key`,
    its `value` (the directory itself, or a file to go in it) and the fix (`key`=`fix`).
    Writes a probe into the nearest existing folder (permission bits don't stop root, a
    read-only disk does; an anonymous temporary file, so nothing is left behind even when the
    write fails) and makes no folder. The one writability check of the project: train.py's run
    directory, sample.py's and eval.py's out=, before Hydra creates them and again at start."""
    directory = Path(directory).absolute()
    value = Path(value).absolute() if value is not None else directory
    ancestor = nearest_existing(directory)
    if not ancestor.is_dir():
        where = "is a file" if ancestor == value else f"lies under the file {ancestor}"
        raise NotADirectoryError(f"{key}={value} {where}; give a path in a directory: {key}={fix}")
    try:
        with tempfile.TemporaryFile(dir=ancestor) as probe:
            probe.write(b"ok")  # a full disk creates the file and fails the write
            probe.flush()
    except OSError as e:
        raise PermissionError(
            f"{key}={value}: cannot write to {ancestor} ({e.strerror or e}); choose a "
            f"writable place: {key}={fix}"
        ) from None


def _kind(mode: int) -> str:
    """What a file that is not a regular one is (as `ls -l`'s first letter tells)."""
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def _named(path: Path, key: str | None) -> str:
    return f"{key}={path}" if key else str(path)


def _check_mode(path: Path, info: os.stat_result, key: str | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(
            f"{_named(path, key)} is {_kind(info.st_mode)}, not a regular file; give a file"
        )


def check_regular(path: str | Path, key: str | None = None) -> None:
    """Refuse, in one line naming `key`=`path`, a path that is not a regular file (a FIFO, a
    device, a socket), before a library opens it: a FIFO blocks open() until someone writes
    to it, a device (/dev/zero) reads forever. Missing: FileNotFoundError naming the path."""
    _check_mode(Path(path), os.stat(path), key)  # follows symlinks, as opening it would


def read_regular(path: str | Path, max_bytes: int, key: str | None = None) -> bytes:
    """The bytes of `path`, refused in one line naming `key`=`path` unless it is a regular
    file (`check_regular`) of at most `max_bytes`. It is opened non-blocking, so a FIFO swapped
    in after a check cannot block either, and read with a cap (a file growing meanwhile is
    cut off, not followed)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # FileNotFoundError names the path
    try:
        info = os.fstat(fd)
        _check_mode(path, info, key)
        if info.st_size > max_bytes:
            raise ValueError(
                f"{_named(path, key)} is {info.st_size / 2**20:.0f} MiB, more than the "
                f"{max_bytes / 2**20:.0f} MiB such a file may have; give a smaller file"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ValueError(f"{_named(path, key)} grew past {max_bytes / 2**20:.0f} MiB while read")
    return data


def load_failure(error: BaseException) -> str:
    """Why a cache file did not load, in a few words: never torch's advice to load it with
    weights_only=False (the unsafe way round, for a file that may be anyone's)."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds more than tensors and plain data (a pickle that could run code)"
    first = (str(error).splitlines() or [""])[0].split(". ")[0].rstrip(".")  # its first sentence
    if "weights_only" in first:
        first = "refused by the weights-only loader"
    return f"it does not load ({type(error).__name__}: {first[:160]})"


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks: cache keys and checks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict:
    """A run's JSON file, or an error that names it (a run killed while writing leaves it cut)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        msg = f"{path}: not readable JSON ({e}); rerun that job or delete the file"
        raise ValueError(msg) from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
