"""Never lose a run: exact resume after SIGKILL, corrupt-checkpoint fallback, saving on
SIGTERM / SLURM's SIGUSR1, divergence stops, atomic writes, unwritable outputs."""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, final_state, run_script, train_config

from ddpm.checkpoint import CheckpointError
from ddpm.files import check_output_dir
from ddpm.run.checkpoints import (
    AtomicCheckpointIO,
    checkpoint_files,
    find_checkpoint,
    remove_dead_writes,
)
from ddpm.run.resume import resume_from

# 40 tiny steps over 5-batch epochs (so runs cross epoch boundaries), a checkpoint every 4
RUN = [
    *FAST,
    "trainer.max_steps=40",
    "+trainer.limit_train_batches=5",
    "trainer.val_check_interval=4",
    "callbacks.model_checkpoint.every_n_train_steps=4",
]


def start(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path.name}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path):
    """The same losses for every step and the same final weights (network and EMA), whether
    the run was killed at a random point and rerun, or never interrupted."""
    whole = tmp_path / "whole"
    proc = start(whole)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]

    killed = tmp_path / "killed"
    proc = start(killed)
    k = random.choice([8, 12, 16, 20, 24])
    wait_for(killed / "checkpoints" / f"step_{k:07d}.ckpt", proc)
    time.sleep(random.uniform(0, 0.3))  # anywhere in the steps that follow
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    saved = find_checkpoint(killed)[1]["global_step"]
    assert saved < 40, f"the run finished before the kill (step {k})"
    proc = start(killed)  # the same command: resume=auto
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in out  # Hydra logs to stdout

    steps, losses, weights = final_state(whole)
    steps2, losses2, weights2 = final_state(killed)
    assert steps2 == steps == list(range(1, 41)), (steps2, saved)
    torch.testing.assert_close(losses2, losses, msg=f"killed after step {saved}")
    assert weights.keys() == weights2.keys() and any(k.startswith("ema.") for k in weights)
    for name in weights:
        torch.testing.assert_close(weights2[name], weights[name], msg=name)
    # the logs of both parts are kept: logs/metrics.csv and logs/resume1/metrics.csv
    assert (killed / "logs" / "metrics.csv").is_file()
    assert (killed / "logs" / "resume1" / "metrics.csv").is_file()


@pytest.mark.slow
def test_truncated_checkpoint_is_skipped_by_name(trained_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # as if killed mid-write by an unsafe writer
    proc = run_script("train.py", *FAST, f"hydra.run.dir={run}", "trainer.max_steps=6")
    assert f"skipping checkpoint {last}" in proc.stdout  # Hydra logs to stdout
    assert f"resuming from {run / 'checkpoints' / 'step_0000004.ckpt'}" in proc.stdout
    # set aside, not deleted; the resumed run wrote a whole last.ckpt of its own
    assert (run / "checkpoints" / "last.ckpt.corrupt").stat().st_size == 1000
    assert torch.load(last, weights_only=True)["global_step"] == 6


@pytest.mark.slow
def test_fresh_run_never_overwrites_checkpoints(trained_run: Path):
    before = {p: p.read_bytes() for p in (trained_run / "checkpoints").glob("*.ckpt")}
    proc = run_script("train.py", *FAST, f"hydra.run.dir={trained_run}", "resume=null", check=False)
    assert proc.returncode != 0
    assert "already holds checkpoints" in proc.stderr and "resume=auto" in proc.stderr
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow
def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    bad = tmp_path / "checkpoints" / "last.ckpt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_script("train.py", *FAST, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "none of the 1 checkpoints" in proc.stderr
    assert bad.read_bytes() == b"not a checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits(tmp_path: Path, sig: str):
    """SIGTERM, SLURM's SIGUSR1 and Ctrl-C (SIGINT) each save last.ckpt at the end of the
    step, log that step's metrics (the last row of metrics.csv), exit, and the rerun resumes."""
    run = tmp_path / "run"
    proc = start(run, "trainer.max_steps=100000")
    wait_for(run / "checkpoints" / "step_0000004.ckpt", proc)
    proc.send_signal(signal.Signals[sig])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.Signals[sig], err[-3000:]
    assert f"stopped by {sig} at step" in out and "rerun the same command" in out
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 4 <= step < 100000
    # Lightning's CSV rows count steps from 0: global step N is row step N - 1
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    logged = [int(r["step"]) + 1 for r in rows if r.get("train/loss")]
    assert logged[-1] == step, (logged[-3:], step)
    # and the rerun continues from there
    proc = run_script("train.py", *RUN, f"hydra.run.dir={run}", f"trainer.max_steps={step + 2}")
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in proc.stdout
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == (
        step + 2
    )


@pytest.mark.slow
def test_slurm_sigusr1_saves_and_requeues(tmp_path: Path):
    """Under SLURM (its variables set, a stand-in scontrol on PATH that records its arguments),
    SIGUSR1 saves the checkpoint and runs `scontrol requeue <job id>`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    scontrol.chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    run = tmp_path / "run"
    proc = start(run, "trainer.max_steps=100000", env=slurm)
    wait_for(run / "checkpoints" / "step_0000004.ckpt", proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert record.read_text().split() == ["requeue", "4242"]
    assert "scontrol requeue 4242: done" in out
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] >= 4


def test_slurm_run_directory_is_the_job_id():
    """A requeued job reruns the same command: its run directory must not depend on the time."""
    from conftest import compose_config

    os.environ["SLURM_JOB_ID"] = "777"
    try:
        cfg = compose_config()
        assert cfg.hydra.run.dir.endswith("quickstart/777")
    finally:
        del os.environ["SLURM_JOB_ID"]


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    """An absurd learning rate: step 1 is finite, step 2's loss is not. The run stops naming
    step 2, and nothing is written after step 1's checkpoint."""
    proc = run_script(
        "train.py",
        *FAST,
        f"hydra.run.dir={tmp_path}",
        "module.optimizer.lr=1e38",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        check=False,
    )
    assert proc.returncode != 0
    assert "DivergenceError" in proc.stderr and "non-finite at step 2" in proc.stderr
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step_0000001.ckpt"]
    for name in names:
        ckpt = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert ckpt["global_step"] == 1
        assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*untouched"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path: Path):
    """Files written atomically (sample.py's PNGs, sample.json, caches) are as readable as any
    the user writes, not mkstemp's private 0600."""
    from ddpm.files import atomic_write

    (tmp_path / "plain").write_bytes(b"x")
    written = atomic_write(tmp_path / "atomic", lambda f: f.write(b"x"))
    assert written.stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.slow
def test_unwritable_run_directory_fails_at_start(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory should go")
    shown = f"hydra.run.dir={blocker / 'run'} lies under the file {blocker}"
    with pytest.raises(NotADirectoryError, match=shown):
        check_output_dir(blocker / "run", "hydra.run.dir")
    proc = run_script("train.py", *FAST, f"hydra.run.dir={blocker / 'run'}", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith(f"Error: {shown}; give a path in a directory")
    assert "Traceback" not in proc.stderr


def test_keep_last_k_and_a_failed_save_deletes_nothing(tmp_path: Path, monkeypatch):
    """save_top_k=2 keeps the two newest periodic checkpoints; when a save fails (disk full),
    the exception comes before Lightning removes anything, so the older ones stay whole."""
    from conftest import compose_config
    from omegaconf import open_dict

    from ddpm.cli import train as training

    def cfg(run: Path, *extra: str):
        c = compose_config(
            [*FAST, "callbacks.model_checkpoint.save_top_k=2", "trainer.max_steps=8", *extra]
            + [f"hydra.runtime.output_dir={run}"]
        )
        with open_dict(c):
            del c["hydra"]
        return c

    training.train(cfg(tmp_path / "a"))
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step_0000006.ckpt", "step_0000008.ckpt"]

    real_save, calls = torch.save, []

    def fails_on_third(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # step 2 (periodic + last), step 4 (periodic + last), step 6
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fails_on_third)
    with pytest.raises(CheckpointError, match="No space left on device"):
        training.train(cfg(tmp_path / "b"))
    monkeypatch.undo()
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert kept == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]  # nothing half-written
    for name in kept:
        torch.load(tmp_path / "b" / "checkpoints" / name, weights_only=True)


def train_in(run: Path, *overrides: str) -> dict:
    """training.train in-process, with `run` as the run directory."""
    from ddpm.cli import train as training

    return training.train(train_config(run, [*FAST, *overrides]))


def test_auto_resume_picks_the_highest_step_not_the_newest_file(trained_run: Path, tmp_path):
    """A copy that doesn't keep file times (cp without -p, rsync without -t) can make an older
    checkpoint the newest file: resume=auto goes by the step saved in each."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    older = run / "checkpoints" / "step_0000002.ckpt"
    later = time.time() + 3600
    os.utime(older, (later, later))
    path, ckpt = find_checkpoint(run)
    assert ckpt["global_step"] == 4 and path != older
    assert checkpoint_files(run)[-1] == older


def test_resume_into_another_runs_directory_is_refused(trained_run: Path, tmp_path: Path):
    """resume=PATH of one run's checkpoint with a run directory that holds another run: refused
    before anything is written, naming both and the ways out; within its own run it is fine."""
    import shutil

    mine, other = tmp_path / "mine", tmp_path / "other"
    shutil.copytree(trained_run, mine)
    shutil.copytree(trained_run, other)
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    assert {"metrics.json", "loss_curve.png", "run.json"} <= {p.name for p in before}
    ckpt = other / "checkpoints" / "step_0000002.ckpt"
    with pytest.raises(CheckpointError) as info:
        train_in(mine, f"resume={ckpt}")
    message = str(info.value)
    assert f"resume={ckpt} is not a checkpoint of the run in {mine}" in message
    assert f"hydra.run.dir={other};" in message and "resume=auto" in message
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before
    own = mine / "checkpoints" / "step_0000002.ckpt"  # this run, from an earlier step: allowed
    assert resume_from(str(own), mine)[1]["global_step"] == 2


def test_dead_writes_are_removed(tmp_path: Path, caplog):
    """The temporary files of checkpoint writes that were killed midway; nothing else."""
    (tmp_path / "checkpoints").mkdir()
    dead = [
        tmp_path / "checkpoints" / ".last.ckpt.0a1b2c3d.tmp",
        tmp_path / "checkpoints" / ".step_0000004.ckpt.deadbeef.tmp",
        tmp_path / ".hpc_ckpt_1.ckpt.12345678.tmp",
    ]
    kept = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / "notes.tmp"]
    for path in dead + kept:
        path.write_bytes(b"x" * 100)
    with caplog.at_level("WARNING"):
        assert sorted(remove_dead_writes(tmp_path)) == sorted(dead)
    assert not any(p.exists() for p in dead) and all(p.exists() for p in kept)
    assert "removed 3 unfinished checkpoint writes" in caplog.text
    assert ".last.ckpt.0a1b2c3d.tmp" in caplog.text


@pytest.mark.slow
def test_keep_last_k_holds_after_kills(tmp_path: Path):
    """save_top_k=2 across a kill: a periodic checkpoint that a kill left undeleted (between
    writing the next one and deleting it), the checkpoint resumed from (Lightning never deletes
    that one) and the temporary file of a killed write are all gone once the resumed run has
    written two newer ones."""
    run = tmp_path / "run"
    keep = ["callbacks.model_checkpoint.save_top_k=2"]
    train_in(run, *keep, "trainer.max_steps=8")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "step_0000006.ckpt",
        "step_0000008.ckpt",
    ]
    # step 2's file as a kill between saving step 6 and deleting step 2 would leave it
    left = torch.load(ckpts / "step_0000006.ckpt", weights_only=True)
    left["global_step"] = 2
    for state in left["callbacks"].values():
        if "current_score" in state:
            state["current_score"] = torch.tensor(2)
    torch.save(left, ckpts / "step_0000002.ckpt")
    (ckpts / ".step_0000010.ckpt.0badf00d.tmp").write_bytes(b"half a checkpoint")
    train_in(run, *keep, "trainer.max_steps=12", f"resume={ckpts / 'step_0000006.ckpt'}")
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "step_0000010.ckpt",
        "step_0000012.ckpt",
    ]


def test_out_of_memory_names_the_batch_size(monkeypatch, tmp_path: Path):
    """Out of memory in training: one line that says which settings to lower (and how to keep
    the effective batch), not torch's allocator report."""
    from ddpm.cli.errors import InputError
    from ddpm.module import DiffusionModule

    def too_big(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(DiffusionModule, "training_step", too_big)
    with pytest.raises(InputError) as info:
        train_in(tmp_path / "run")
    assert str(info.value).startswith(
        "Error: out of memory in training (CUDA out of memory. Tried to allocate 20.00 GiB). "
        "Lower dataset.batch_size (now 8) and raise trainer.accumulate_grad_batches"
    )


@pytest.mark.slow
def test_skipped_nonfinite_steps_leave_the_loss_curve_whole(tmp_path: Path):
    """module.nonfinite=skip with a learning rate that makes every loss after the first
    non-finite: the run finishes and plots every step, the skipped ones as gaps (NaN; it
    crashed with KeyError)."""
    run = tmp_path / "run"
    train_in(
        run,
        "module.optimizer.lr=1e38",
        "module.nonfinite=skip",
        "callbacks.loss_curve.every_n_steps=1",
        "trainer.max_steps=6",
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and (run / "loss_curve.png").is_file()
    curve = ckpt["callbacks"]["LossCurve"]
    assert curve["steps"] == [1, 2, 3, 4, 5, 6] and math.isfinite(curve["losses"][0])
    assert all(math.isnan(v) for v in curve["losses"][1:])  # the skipped updates: gaps


def test_changed_schedule_on_resume_goes_on_only_when_allowed(trained_run: Path, caplog):
    """resume_changes=allow: the same change as the table's refused one is a warning."""
    from ddpm.run.resume import check_same_process

    path = trained_run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    schedule = {**ckpt["hyper_parameters"]["schedule"], "timesteps": 500}
    objective = ckpt["hyper_parameters"]["objective"]
    check_same_process(path, ckpt, ckpt["hyper_parameters"]["schedule"], objective, allow=False)
    with pytest.raises(CheckpointError, match=r"schedule.timesteps=1000 \(this run: 500\)"):
        check_same_process(path, ckpt, schedule, objective, allow=False)
    with caplog.at_level("WARNING"):
        check_same_process(path, ckpt, schedule, objective, allow=True)
    assert "resume_changes=allow: resuming" in caplog.text and "timesteps=1000" in caplog.text


def test_a_network_chosen_by_attention_level_resumes_one_chosen_by_size():
    """The quickstart's model moved from attn_resolutions=[7] to attn_levels=[-1] (the same
    network at 28 px): its older runs resume; an attention change that builds another
    network is still named."""
    from ddpm.run.resume import check_same_network

    old = {"_target_": "ddpm.unet.UNet", "image_size": 28, "ch": 32, "ch_mult": [1, 2, 2]}
    new = {**old, "attn_resolutions": [], "attn_levels": [-1]}
    check_same_network(
        Path("old.ckpt"), {"hyper_parameters": {"net": {**old, "attn_resolutions": [7]}}}, new
    )
    with pytest.raises(
        CheckpointError,
        match=r"old.ckpt was trained with attention at \[14\] px, this run's network attends at "
        r"\[7\] px. Resume with model.attn_resolutions=\[14\] model.attn_levels=\[\]",
    ):
        check_same_network(
            Path("old.ckpt"), {"hyper_parameters": {"net": {**old, "attn_resolutions": [14]}}}, new
        )
