"""Writing a file so that readers see the old one or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(f)` into a temporary file of its own beside `path` (two writers never share one),
    then rename it into place (atomic on POSIX): a killed or racing writer never leaves a
    truncated `path`. The temporary file is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
