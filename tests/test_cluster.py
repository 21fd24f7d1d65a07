"""The cluster path as the README gives it: hydra/launcher=slurm writes a valid sbatch script
(checked by a stand-in `sbatch`), a job it can't size fails before submission, DDP inside
submitit's launcher, and submitit's USR2 saving, requeueing and resuming exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, compose_config, final_state, run_script

from ddpm.run.launch import launcher_problem

# The stand-in validates the script it is given as SLURM would refuse it (counts must be
# positive integers) and as this project needs it (one task per GPU, submitit's USR2 warning
# before the time limit), records it, and then fails: there is no cluster to run it on.
SBATCH = """#!{python}
import re, sys
from pathlib import Path

script = Path(sys.argv[-1]).read_text()
options = dict(re.findall(r"^#SBATCH --([a-z-]+)=(.*)$", script, re.M))
problems = []
for key in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time"):
    if not re.fullmatch(r"[1-9][0-9]*", options.get(key, "")):
        problems.append(f"--{{key}}={{options.get(key)}}")
if options.get("ntasks-per-node") != options.get("gpus-per-node"):
    problems.append("--ntasks-per-node != --gpus-per-node")
if not re.fullmatch(r"USR2@[1-9][0-9]*", options.get("signal", "")):
    problems.append(f"--signal={{options.get('signal')}}")
if not re.search(r"^srun .* -m submitit\\.core\\._submit ", script, re.M):
    problems.append("no srun of submitit's job")
record = Path({record!r})
record.mkdir(exist_ok=True)
n = len(list(record.glob("*.sh")))
(record / f"{{n}}.sh").write_text(script)
(record / f"{{n}}.verdict").write_text("; ".join(problems) or "valid")
print("sbatch: error: " + ("; ".join(problems) or "stand-in, no cluster here"), file=sys.stderr)
sys.exit(1)
"""


def stand_in_slurm(tmp_path: Path) -> tuple[dict, Path]:
    """PATH with a validating `sbatch` and an `srun` (submitit only checks it exists)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH.format(python=sys.executable, record=str(record)))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, record


def train(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_slurm_line_writes_a_valid_sbatch_script(tmp_path: Path):
    """The README's line, run against a stand-in sbatch: 4 GPUs and 4 tasks per node, a job
    array of the 2 schedules, USR2 120 s before the time limit."""
    env, record = stand_in_slurm(tmp_path)
    proc = train(
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "trainer=ddp",
        "hydra.launcher.gpus_per_node=4",
        "schedule=linear,cosine",
        f"paths.log_dir={tmp_path / 'runs'}",
        env=env,
    )
    assert "stand-in, no cluster here" in proc.stderr, proc.stderr[-3000:]
    assert (record / "0.verdict").read_text() == "valid"
    script = (record / "0.sh").read_text()
    for line in ("--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=1", "--array=0-1%2"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --partition=gpu\n" in script and "#SBATCH --signal=USR2@120\n" in script


def test_slurm_without_a_gpu_count_fails_before_submitting(tmp_path: Path):
    """trainer=ddp's devices=-1 can't size a SLURM job: one line naming both keys, no
    traceback, and sbatch is never called."""
    env, record = stand_in_slurm(tmp_path)
    proc = train(
        "-m",
        "hydra/launcher=slurm",
        "trainer=ddp",
        "schedule=linear,cosine",
        f"paths.log_dir={tmp_path / 'runs'}",
        env=env,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "trainer.devices=-1" in lines[0] and "hydra.launcher.gpus_per_node=N" in lines[0]
    assert not record.exists()


@pytest.mark.parametrize(
    "overrides, tasks",
    [
        (["trainer=ddp", "trainer.devices=2"], 2),  # an explicit count
        (["trainer=ddp", "hydra.launcher.gpus_per_node=8"], 8),  # devices -1: every GPU
        (["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"], 4),
    ],
)
def test_slurm_job_size_follows_the_trainer(overrides: list[str], tasks: int, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: f"/bin/{name}")  # as on a login node
    cfg = compose_config(["hydra/launcher=slurm", *overrides])
    launcher = cfg.hydra.launcher
    assert launcher.tasks_per_node == launcher.gpus_per_node == tasks
    assert launcher.nodes == cfg.trainer.num_nodes
    assert launcher_problem(cfg) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["hydra/launcher=slurm", "trainer=ddp"], "hydra.launcher.gpus_per_node=N"),
        (
            ["hydra/launcher=slurm", "trainer.devices=2", "hydra.launcher.gpus_per_node=4"],
            "trainer.devices=2 but hydra.launcher.tasks_per_node=4",
        ),
        (
            ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"],
            "keep hydra.launcher.tasks_per_node=1",
        ),
    ],
)
def test_launcher_problems_are_named(overrides: list[str], message: str, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: f"/bin/{name}")
    assert message in launcher_problem(compose_config(overrides))


def test_slurm_launcher_off_a_cluster_is_one_line(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    problem = launcher_problem(compose_config(["hydra/launcher=slurm", "trainer.devices=2"]))
    assert "no `srun` on PATH" in problem


def job_dirs(sweep_parent: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_parent.glob("*/multirun_*/*/.hydra"))


@pytest.mark.slow
def test_ddp_inside_the_submitit_launcher_finishes_every_job(tmp_path: Path):
    """2 jobs x 2 gloo processes under hydra/launcher=submitit_local: submitit starts each
    job, Lightning its second rank (rerunning train.py for that job, not submitit's entry
    point)."""
    import json

    proc = run_script(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        "trainer=ddp_cpu",
        "seed=0,1",
        *FAST,
        f"paths.log_dir={tmp_path}",
    )
    assert "unrecognized arguments" not in proc.stderr
    jobs = job_dirs(tmp_path)
    assert len(jobs) == 2
    for job in jobs:
        assert json.loads((job / "run.json").read_text())["world_size"] == 2
        assert json.loads((job / "metrics.json").read_text())["step"] == 4


# 40 tiny steps over 5-batch epochs, a checkpoint every 4 (as tests/test_resume.py's runs)
RUN = [
    *FAST,
    "trainer.max_steps=40",
    "+trainer.limit_train_batches=5",
    "trainer.val_check_interval=4",
    "callbacks.model_checkpoint.every_n_train_steps=4",
]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_submitit_usr2_saves_requeues_and_resumes_exactly(tmp_path: Path):
    """USR2 (submitit's preemption / time-limit signal) to a job of hydra/launcher=
    submitit_local: last.ckpt is saved after the current step, submitit requeues the job, and
    the requeued job continues from it to the same losses and weights as a run never
    interrupted."""
    whole = tmp_path / "whole"
    run_script("train.py", *RUN, f"hydra.run.dir={whole}")

    runs = tmp_path / "runs"
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local"]
    proc = subprocess.Popen(
        [*command, *RUN, f"paths.log_dir={runs}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/multirun_*/*/checkpoints/step_0000008.ckpt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 8"
        time.sleep(0.02)
    # submitit_local names a job's folder after the process that controls its task
    controller = next(p for p in runs.glob("*/multirun_*/.submitit/*") if p.name.isdigit())
    (task,) = children(int(controller.name))
    os.kill(task, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    (job,) = job_dirs(runs)
    log = (controller / f"{controller.name}_0_log.out").read_text()  # both parts of the job
    assert "stopped by SIGUSR2 at step" in log and "submitit requeues the job" in log, log[-3000:]
    assert f"resuming from {job / 'checkpoints' / 'last.ckpt'}" in log
    steps, losses, weights = final_state(whole)
    steps2, losses2, weights2 = final_state(job)
    assert steps2 == steps == list(range(1, 41))
    torch.testing.assert_close(losses2, losses)
    assert weights.keys() == weights2.keys()
    for name in weights:
        torch.testing.assert_close(weights2[name], weights[name], msg=name)
