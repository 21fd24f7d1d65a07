"""ddpm: denoising diffusion models, trained and evaluated with Lightning and Hydra.

The public API for scripts is `ddpm.load_module(path)`: the `DiffusionModule` of a checkpoint
(EMA network at `.ema.module`, the noise schedule at `.schedule`, `.hparams.objective`).
The package's layout and its layers: docs/design.md.
"""

from __future__ import annotations

from typing import Any

from ddpm import moved

__all__ = ["load_module"]


def __getattr__(name: str) -> Any:
    """Loaded when first asked for (importing `ddpm.schedule` needs no Lightning), and the
    names of the flat package's modules (`ddpm.callbacks.FID` in a config: `ddpm.moved`)."""
    if name == "load_module":
        from ddpm.module import load_module  # lazy (PEP 562): test_structure allows it here

        return load_module
    if name in moved.MODULES:
        return moved.OldModule(name)
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
