"""Writing a file so that readers see the old one or the new one, never half of one; and
checking at start that an output place can be written at all."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import BinaryIO


def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask (read once, at import)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(f)` into a temporary file of its own beside `path` (two writers never share one),
    then rename it into place (atomic on POSIX): a killed or racing writer never leaves a
    truncated `path`. The temporary file is removed if writing fails. The file gets the mode
    a plain open() would give it (mkstemp's are private, 0600: unreadable to a colleague)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    Writes a probe file into the nearest existing folder (permission bits don't stop root, a
    read-only disk does) and makes no folder."""
    directory = Path(directory).absolute()
    value = Path(value).absolute() if value is not None else directory
    ancestor = nearest_existing(directory)
    if not ancestor.is_dir():
        where = "is a file" if ancestor == value else f"lies under the file {ancestor}"
        raise NotADirectoryError(f"{key}={value} {where}; give a path in a directory: {key}={fix}")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
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
