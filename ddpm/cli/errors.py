"""Bad inputs reported as one line: the entry points' known errors (a wrong value, a missing or
unwritable file, a refused checkpoint) end the program with `Error: <message>` alone, and so
does the output-directory check all three run before Hydra creates the directory
(`CheckOutputDir`); `HYDRA_FULL_ERROR=1` lets the original error through, for Hydra to print
with its whole trace."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.errors import CompactHydraException, InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ddpm.checkpoint import CheckpointError
from ddpm.files import check_output_dir
from ddpm.run.runlock import check_free
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


# What gloo and NCCL raise (a RuntimeError, or its DistBackendError / DistNetworkError) when a
# peer rank died (a closed or reset connection) or stopped answering (a collective's timeout,
# trainer.strategy.timeout of conf/trainer/ddp.yaml)
DEAD_PEER = re.compile(
    r"Connection (closed|reset) by peer|Timed out waiting|timed out after|Broken pipe"
    r"|NCCL communicator was aborted|Watchdog caught collective operation timeout"
)
# ... and when not every rank joined the rendezvous within that timeout
NOT_JOINED = re.compile(r"\d+/\d+ clients joined|waiting for clients")


def _environ(pid: int | str) -> dict[str, str]:
    """A process's environment as it was started (/proc/PID/environ; {} where unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(
        item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
    )


def _launched_ranks() -> dict[int, dict[str, str]]:
    """The ranks this process launched, by pid, with their environment: Lightning starts ranks
    1.. as children of rank 0, LOCAL_RANK and WORLD_SIZE in their environment."""
    pids = [
        int(p) for f in Path("/proc/self/task").glob("*/children") for p in f.read_text().split()
    ]
    found = {pid: _environ(pid) for pid in pids}
    return {pid: env for pid, env in found.items() if "LOCAL_RANK" in env}


def _rank_and_world() -> tuple[int | None, int | None]:
    """This process's global rank and the world size (None where unknown). By the time an
    error reaches `one_line_errors` the run has destroyed its process group and restored
    os.environ, and a dead rank is gone: the rank is Lightning's (its DDP strategy sets it and
    leaves it), the size what the ranks were started with (a launched rank's environment, a
    living child rank's for rank 0; torchrun and SLURM set them at start too) or else what
    this run's run.json recorded."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    children = list(_launched_ranks().values())
    env = (children[0] if children else {}) | _environ("self") | dict(os.environ)
    world = _number(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS")) or _recorded_world()
    return getattr(rank_zero_only, "rank", None), world


def _recorded_world() -> int | None:
    run_dir = _run_dir()
    try:
        return int(json.loads((Path(run_dir) / "run.json").read_text())["world_size"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _number(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _peer(rank: int | None, world: int | None) -> str:
    """Which rank the dead peer is: with two, the other one; with more, gloo and NCCL don't say."""
    if world == 2 and rank in (0, 1):
        return f"rank {1 - rank} of 2"
    return f"another rank (of {world})" if world else "another rank"


def _kill_launched_ranks() -> None:
    """SIGKILL the ranks this process launched: a stopped or hung one would outlive the run,
    holding its memory and GPU. Each is reaped at once, so Lightning's child-process observer
    sees it gone, not failed, and does not kill this process before its message is printed."""
    for pid in _launched_ranks():
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (OSError, ChildProcessError):
            continue  # gone already


def _run_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def dead_peer_line(error: BaseException) -> str | None:
    """The one line for a dead or silent DDP peer's gloo/NCCL error (None for other errors):
    which rank stopped answering, and that rerunning into the same run directory resumes."""
    message = str(error).strip()
    dist_error = getattr(torch.distributed, "DistError", ())  # gloo's own are RuntimeErrors
    distributed = isinstance(error, dist_error) or "gloo" in message
    rank, world = _rank_and_world() if distributed or "NCCL" in message else (None, None)
    if not distributed and not (world and world > 1):  # not DDP's: some other RuntimeError
        return None
    first = (message.splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*\] ", "", first)  # gloo's [/path/to/pair.cc:534] prefix
    first = first.split(". ")[0].rstrip(".")  # and its advice (ending "GLHF!")
    run_dir = _run_dir()
    rerun = f" with hydra.run.dir={run_dir}" if run_dir else ""
    if NOT_JOINED.search(message):
        return (
            f"Error: not every DDP rank started within the collective timeout ({first}): one "
            "failed at its start (its error is above) or starts slowly; rerun the same command"
            f"{rerun}, or raise trainer.strategy.timeout.seconds"
        )
    if not DEAD_PEER.search(message):
        return None
    seen = f" (seen from rank {rank})" if rank is not None else ""
    waited = ", after trainer.strategy.timeout.seconds" if "imed out" in first else ""
    return (
        f"Error: {_peer(rank, world)} stopped answering{seen}: it died, was killed or hangs "
        f"({first}{waited}). Rerun the same command{rerun} to resume from the run's last "
        "checkpoint (resume=auto)"
    )


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
    except RuntimeError as e:  # a DDP peer died or stopped answering (gloo, NCCL)
        line = dead_peer_line(e)
        if line is None or _full_trace():
            raise
        _kill_launched_ranks()
        raise SystemExit(line) from None


class CheckOutputDir(Callback):
    """The Hydra callback of all three entry points: an output directory (the option `key`)
    that is a file, lies under one or cannot be written is one line, before Hydra's own attempt
    to create it fails with a traceback. With `lock` (train.py), one that a live run holds
    (`ddpm.run.runlock`) too, before Hydra rewrites the running job's .hydra/; a sweep's
    directory is checked at the sweep's start, each job's as it starts (`ddpm.cli.train`)."""

    def __init__(self, key: str = "hydra.run.dir", fix: str = "DIR", lock: bool = False) -> None:
        self.key, self.fix, self.lock = key, fix, lock

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors():  # Hydra turns a callback's exceptions into warnings
            check_output_dir(config.hydra.run.dir, self.key, fix=self.fix)
            if self.lock:
                check_free(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors():
            check_output_dir(config.hydra.sweep.dir, "hydra.sweep.dir", fix=self.fix)
