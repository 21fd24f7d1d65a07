"""Safe checkpoint loading (`ddpm.module.load_module` rebuilds a model from what this loads).

Checkpoints hold plain data only (tensors, numbers, strings, lists, dicts), so they load with
`torch.load(weights_only=True)`, which refuses to run code from a malicious pickle; and the
configs in their `hyper_parameters` may name only what `ddpm.trusted` allows, so that
rebuilding the model from them runs no code the file chose.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ddpm.trusted import check_hyper_parameters


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or from another model."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint as plain data, with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            found = sorted(p.name for p in path.parent.glob("*.ckpt"))[:5]
            hint = f"; checkpoints in {path.parent}: {found}" if found else ""
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long (and colored); its "Unsupported global: ..." line says what
        found = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        name = (
            found[0].removeprefix("WeightsUnpickler error: ").split(" was not")[0] if found else ""
        )
        what = f" ({name})" if name else ""
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than plain tensors and numbers, "
            f"which could run code when unpickled{what}. Only load checkpoints written by this "
            "project or from a source you trust."
        ) from None  # not torch's error, whose advice is to load it unsafely (weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        if "weights_only" in str(e):  # e.g. a TorchScript file: torch's text advises the
            # unsafe load, which a file from anyone must never be given (nor its chained cause)
            raise CheckpointError(
                f"refused to load {path}: the weights-only loader does not read it (a "
                "TorchScript file, or another format that runs code when loaded). Only load "
                "checkpoints written by this project or from a source you trust."
            ) from None
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {e}"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    # its configs are rebuilt with hydra.utils.instantiate: they may name only what we build
    check_hyper_parameters(ckpt.get("hyper_parameters"), path)
    return ckpt
