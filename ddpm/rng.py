"""Every RNG in every checkpoint: Lightning saves no RNG state, so a resumed run would draw
other timesteps and noise than the run it continues. `RNGCapture` (one of the DiffusionModule's
own callbacks) saves the Python, NumPy, torch and CUDA generators and restores them on resume."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


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
