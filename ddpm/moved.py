"""The names of the flat package that came before the regrouping into data/, metrics/, run/
and cli/ (2026-12-02), and where they live now.

Configs users wrote (`_target_: ddpm.callbacks.FID`, `ddpm.latents.LatentDataModule`) and the
checkpoints of earlier runs (whose `dataset` record names `ddpm.data.ImageDataModule`) keep
working: Hydra locates `ddpm.callbacks.FID` by attribute access from `ddpm`, which
`ddpm.__getattr__` answers with an `OldModule` that looks each name up in its new homes.
Python's `import` statement does not go through it: scripts import the new paths (or the
package API, `ddpm.load_module`). Hand-written because neither Hydra nor Python has a module
alias for a package that was split; `canonical` gives one name per class for comparisons.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

# old module (ddpm.<name>) -> the modules its names went to, searched in this order
MODULES: dict[str, tuple[str, ...]] = {
    "callbacks": ("ddpm.run.callbacks",),
    "cluster": ("ddpm.run.launch",),
    "tracking": ("ddpm.run.tracking", "ddpm.run.launch"),
    "runlock": ("ddpm.run.runlock",),
    "resume": (
        "ddpm.run.checkpoints",
        "ddpm.run.resume",
        "ddpm.run.stopping",
        "ddpm.rng",
        "ddpm.nonfinite",
    ),
    "training": ("ddpm.cli.train", "ddpm.run.resume"),
    "sampling": ("ddpm.cli.sample", "ddpm.cli.sample_folder"),
    "evaluation": ("ddpm.cli.eval", "ddpm.cli.sources"),
    "errors": ("ddpm.cli.errors",),
    "render": ("ddpm.images", "ddpm.cli.sample_folder"),
    "datasets": ("ddpm.data.loaders",),
    "folder": ("ddpm.data.folder",),
    "fontletters": ("ddpm.data.fontletters",),
    "latents": ("ddpm.data.latents",),
    "inception": ("ddpm.metrics.inception",),
    "reference": ("ddpm.metrics.reference",),
}
# old modules that are packages now: their names were moved into these modules
PACKAGES: dict[str, tuple[str, ...]] = {
    "data": ("ddpm.data.datamodule",),
    "metrics": ("ddpm.metrics.fid",),
}


# names that did not move as they were: said instead of found
RENAMED: dict[str, str] = {
    "resume.CheckRunDirectory": "ddpm.cli.errors.CheckOutputDir (with lock: true)",
}


def find(old: str, homes: tuple[str, ...], name: str) -> Any:
    """`name` of the old module `ddpm.<old>`, from the first of its new homes that has it."""
    if f"{old}.{name}" in RENAMED:
        raise AttributeError(f"ddpm.{old}.{name} is now {RENAMED[f'{old}.{name}']}")
    for home in homes:
        module = importlib.import_module(home)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"ddpm.{old} has no {name!r} (looked in {', '.join(homes)})")


class OldModule(types.ModuleType):
    """A stand-in for a module of the flat package: its attributes come from the new homes."""

    def __init__(self, old: str) -> None:
        super().__init__(f"ddpm.{old}", f"moved: {', '.join(MODULES[old])}")
        self._old = old

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return find(self._old, MODULES[self._old], name)


def canonical(target: Any) -> Any:
    """The current dotted name of what `target` (a `_target_` string, old or new) names, so a
    record of `ddpm.data.ImageDataModule` equals `ddpm.data.datamodule.ImageDataModule`;
    anything else (another package's name, a name that resolves to nothing) as it is."""
    if not isinstance(target, str) or not target.startswith("ddpm."):
        return target
    obj = _locate(target)
    if obj is None:
        return target
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if module and name else target


def _locate(dotted: str) -> Any:
    """What a dotted name names, as Hydra finds a `_target_` (the longest importable module,
    then attributes: the old names through `ddpm.__getattr__`), or None."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        try:
            for part in parts[n:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None
