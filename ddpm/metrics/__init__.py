"""ddpm.metrics: see docs/design.md. The names of the former module `ddpm.metrics` (as configs and
checkpoints of earlier runs name them) are found in its modules (`ddpm.moved`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpm import moved


def __getattr__(name: str) -> Any:
    if name.startswith("__") or (Path(__file__).parent / f"{name}.py").exists():
        raise AttributeError(name)  # a module of the package: the import system's to load
    return moved.find("metrics", moved.PACKAGES["metrics"], name)
