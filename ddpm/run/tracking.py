"""Experiment tracking: the W&B logger (offline when it can't reach the service), what a run
records about itself (command, overrides, git state, effective batch size), and names for the
runs of a sweep.

Lightning's WandbLogger does the logging; what is written here is what it lacks: choosing
offline mode instead of hanging or failing without a network or a login, keeping the run id in
the run directory so a resumed run continues the same W&B run, and grouping / naming the runs
of a Hydra multirun by the sweep and by their overrides.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_said_offline = False


def _wandb_reachable(host: str = "api.wandb.ai", timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.Api(timeout=5).api_key)  # reads ~/.netrc; no request is made
    except Exception:
        return False


def wandb_mode(mode: str = "auto") -> str:
    """online / offline / disabled. auto: WANDB_MODE if set, else online only with a login and
    a reachable api.wandb.ai (checked with a 2 s connect, so nothing hangs)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return "offline" if os.environ["WANDB_MODE"] == "dryrun" else os.environ["WANDB_MODE"]
    if not _logged_in():
        return "offline"
    return "online" if _wandb_reachable() else "offline"


def sweep_identity(fallback_name: str) -> tuple[str | None, str]:
    """(group, name) of this job: in a Hydra multirun the sweep directory's name and the job's
    overrides (e.g. 'schedule=cosine,seed=1'); in a single run no group and `fallback_name`."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra job
        return None, fallback_name
    if hc.mode == RunMode.MULTIRUN:
        group = Path(hc.sweep.dir).name
        return group, hc.job.override_dirname or f"job{hc.job.num}"
    return None, fallback_name


def wandb_logger(
    save_dir: str,
    project: str = "ddpm",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    mode: str = "auto",
    log_model: bool | str = False,
):
    """Lightning's WandbLogger with the run id kept in `<save_dir>/wandb_run_id` (a resumed run
    logs into the same W&B run), grouped and named by the sweep when in a multirun, and offline
    when W&B can't be reached (said once, with the command that uploads it later)."""
    global _said_offline
    from lightning.pytorch.loggers import WandbLogger

    sweep_group, job_name = sweep_identity(name or Path(save_dir).name)
    chosen = wandb_mode(mode)
    id_file = Path(save_dir) / "wandb_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    if log_model and chosen != "online":
        log.warning("W&B: checkpoints are uploaded as artifacts only online; log_model is off")
        log_model = False
    if chosen == "offline" and not _said_offline:
        _said_offline = True
        log.warning(
            "W&B: no login or no connection to api.wandb.ai, logging offline to %s/wandb; "
            "upload later with: wandb sync %s/wandb/offline-run-*",
            save_dir,
            save_dir,
        )
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        entity=entity,
        group=group or sweep_group,
        name=name or job_name,
        tags=list(tags or []),
        id=run_id,
        resume="allow",
        offline=chosen == "offline",
        mode=chosen,  # explicit: wandb 0.31 no longer reads the WANDB_MODE=dryrun Lightning sets
        log_model=log_model,
    )


def git_state(root: str | Path | None = None) -> dict[str, Any]:
    """The commit of the code and whether it had uncommitted changes (None outside git)."""
    root = Path(root or Path(__file__).resolve().parents[1])

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def run_info(cfg: Any, trainer: Any) -> dict[str, Any]:
    """What a run records about itself: how it was started and at what scale."""
    from omegaconf import OmegaConf

    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        pass
    world = int(trainer.world_size)
    accumulate = int(trainer.accumulate_grad_batches)
    batch = int(cfg.dataset.batch_size)
    optimizer = OmegaConf.to_container(cfg.module.optimizer, resolve=True)
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "overrides": overrides,
        "git": git_state(),
        "seed": int(cfg.seed),
        "tags": list(cfg.get("tags") or []),
        "world_size": world,
        "batch_size_per_device": batch,
        "accumulate_grad_batches": accumulate,
        "effective_batch_size": batch * world * accumulate,
        "lr": optimizer.get("lr"),
    }


def record_run(cfg: Any, trainer: Any, loggers: list, out: Path) -> dict[str, Any]:
    """Writes run.json and sends the resolved config and run info to every logger."""
    from omegaconf import OmegaConf

    info = run_info(cfg, trainer)
    if trainer.is_global_zero:
        (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    params = {**OmegaConf.to_container(cfg, resolve=True), "run": info}
    for logger in loggers:
        logger.log_hyperparams(params)
    return info


def dirname(overrides: str, limit: int = 120) -> str:
    """A job's overrides as one directory name: no '/' (a path value would nest directories)
    and not longer than `limit` characters. Registered as the ${ddpm_dirname:...} resolver."""
    name = overrides.replace("/", "_").replace(" ", "")
    return name if len(name) <= limit else name[: limit - 9] + "~" + _digest(name)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:8]
