"""Jobs on a cluster through hydra-submitit-launcher: sizing a SLURM job from the trainer
config before anything is submitted.

Under `hydra/launcher=slurm` SLURM starts one task per GPU (`--ntasks-per-node` =
`--gpus-per-node`) and Lightning's SLURMEnvironment makes each task one DDP rank, so the
task count must be a number. `trainer=ddp` says `devices: -1` ("every GPU"), which SLURM
can't allocate: the count comes from `hydra.launcher.gpus_per_node` or `trainer.devices`.
Under `hydra/launcher=submitit_local` submitit starts one task and Lightning starts the other
ranks itself (`ddpm.tracking.ddp_child_command` reruns train.py for this job alone).
"""

from __future__ import annotations

import shutil
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def launcher_problem(config: DictConfig) -> str | None:
    """What is wrong with the submitit launcher's job size for this trainer, or None."""
    launcher = config.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if "submitit" not in target:
        return None
    devices = config.get("trainer", {}).get("devices")
    tasks, gpus = launcher.get("tasks_per_node"), launcher.get("gpus_per_node")
    if target.endswith("SlurmLauncher"):
        if shutil.which("srun") is None:  # submitit's own check is a traceback
            return (
                "hydra/launcher=slurm found no `srun` on PATH: submit from a SLURM login "
                "node, or leave hydra/launcher out to run the jobs here"
            )
        if not isinstance(tasks, int) or tasks < 1 or (gpus is not None and gpus < 0):
            return (
                f"hydra/launcher=slurm needs a GPU count per node, got trainer.devices={devices} "
                f"(-1: every GPU, which SLURM can't allocate): give it with "
                "hydra.launcher.gpus_per_node=N or trainer.devices=N"
            )
        if isinstance(devices, int) and devices > 0 and devices != tasks:
            return (
                f"trainer.devices={devices} but hydra.launcher.tasks_per_node={tasks}: SLURM "
                "starts one task per device; set hydra.launcher.gpus_per_node (and so "
                f"tasks_per_node) to {devices}, or trainer.devices to {tasks}"
            )
    elif tasks != 1:  # the local launcher: Lightning starts the ranks of a job itself
        return (
            f"hydra.launcher.tasks_per_node={tasks} with hydra/launcher=submitit_local: "
            "Lightning starts a local job's DDP processes itself (trainer.devices); "
            "keep hydra.launcher.tasks_per_node=1"
        )
    return None


class CheckLauncher(Callback):
    """A Hydra callback: a job the launcher can't size is one clear line, before any job is
    submitted (SLURM would otherwise get `--ntasks-per-node=-1`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = launcher_problem(config)
        if problem is not None:
            raise SystemExit(f"Error: {problem}")
