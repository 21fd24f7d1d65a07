"""Launching: jobs on a cluster through hydra-submitit-launcher (sizing a SLURM job from the
trainer config before anything is submitted), and the command Lightning's DDP children run.

Under `hydra/launcher=slurm` SLURM starts one task per GPU (`--ntasks-per-node` =
`--gpus-per-node`) and Lightning's SLURMEnvironment makes each task one DDP rank, so the
task count must be a number. `trainer=ddp` says `devices: -1` ("every GPU"), which SLURM
can't allocate: the count comes from `hydra.launcher.gpus_per_node` or `trainer.devices`.
Under `hydra/launcher=submitit_local` submitit starts one task and Lightning starts the other
ranks itself (`ddpm.run.launch.ddp_child_command` reruns train.py for this job alone).
"""

from __future__ import annotations

import shutil
import sys
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


def ddp_child_command(local_rank: int, script: str | None = None) -> tuple[list[str], str]:
    """The command Lightning's DDP launcher runs for ranks 1.. under Hydra.

    Lightning's own (`_hydra_subprocess_cmd`) repeats sys.argv, so in a multirun every child
    starts the whole sweep again, and it points the child at hydra.run.dir, not at the job's
    directory. This reruns just this job: its own overrides, its own output directory. In a
    job of hydra-submitit-launcher sys.argv is submitit's (`submitit.core._submit FOLDER`),
    so the entry point's own `script` is run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if script is not None:
        command = [sys.executable, script]
    elif __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    directory = hc.runtime.output_dir.replace("\\", "\\\\").replace('"', '\\"')
    command += [
        *hc.overrides.task,
        f'hydra.run.dir="{directory}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def use_ddp_child_command(script: str | None = None) -> None:
    """Lightning's DDP launcher starts ranks 1.. with `ddp_child_command` (running `script`,
    the entry point's file, when given)."""
    from functools import partial

    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = partial(ddp_child_command, script=script)
