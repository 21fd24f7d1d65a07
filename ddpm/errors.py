"""Bad inputs reported as one line: the entry points' known errors (a wrong value, a missing or
unwritable file, a refused checkpoint) end the program with `Error: <message>` alone, as the
run-directory check of train.py does (`ddpm.resume.CheckRunDirectory`); `HYDRA_FULL_ERROR=1`
lets the original error through, for Hydra to print with its whole trace."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from hydra.errors import CompactHydraException, InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ddpm.checkpoint import CheckpointError
from ddpm.files import check_output_dir
from ddpm.trusted import UntrustedFile


class InputError(CompactHydraException):
    """A bad input or file, named with its fix: Hydra prints its message without a traceback
    (the whole trace with HYDRA_FULL_ERROR=1); inside `one_line_errors`, the message alone."""


KNOWN = (ValueError, OSError, CheckpointError, InputError, UntrustedFile)


def _full_trace() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _line(error: BaseException) -> str:
    message = str(error)
    return message if message.startswith("Error: ") else f"Error: {message}"


@contextmanager
def one_line_errors(batch_key: str = "batch_size") -> Iterator[None]:
    """Known errors inside the block as one line (a SystemExit, which Hydra does not wrap in a
    trace); out of memory with the option to lower."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if _full_trace():
            raise
        first = (str(e).splitlines() or [""])[0]
        raise SystemExit(
            f"Error: out of memory ({first}); lower {batch_key}= (images per forward pass)"
        ) from None
    except InstantiationException as e:  # a config's _target_ refused its arguments
        if _full_trace() or not isinstance(e.__cause__, KNOWN):
            raise
        raise SystemExit(_line(e.__cause__)) from None
    except KNOWN as e:
        if _full_trace():
            raise
        raise SystemExit(_line(e)) from None


class CheckOutputDir(Callback):
    """A Hydra callback: a run directory (set from the option `key`) that is a file or cannot
    be written is one line, before Hydra's own attempt to create it fails with a traceback."""

    def __init__(self, key: str = "hydra.run.dir") -> None:
        self.key = key

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors():  # Hydra turns a callback's exceptions into warnings
            check_output_dir(config.hydra.run.dir, self.key)
