"""A finished run keeps its results, one run per directory at a time, and what a resume may
change: reruns of a finished run (same command, a lower max_steps, a finished sweep), the
continuation that merges metrics.json, the run-directory lock, a changed learning rate or
dataset on resume, last.ckpt symlinks, the writability probe."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_script, train_config

from ddpm.checkpoint import CheckpointError
from ddpm.files import check_output_dir
from ddpm.run import runlock
from ddpm.run.runlock import LOCK_NAME, RunLocked


def train_in(run: Path, *overrides: str) -> dict:
    """training.train in-process, with `run` as the run directory."""
    from ddpm.cli import train as training

    return training.train(train_config(run, [*FAST, *overrides]))


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes (Hydra's own .hydra/ and train.log aside:
    Hydra writes them before the job starts)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != "train.log" and ".hydra" not in p.parts
    }


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of conftest's finished 4-step run (so a moved run directory, as its checkpoints'
    paths show)."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    assert metrics(copy)["step"] == 4 and "val/bpd" in metrics(copy)
    return copy


@pytest.mark.parametrize("overrides", [[], ["trainer.max_steps=2"]], ids=["same", "lower"])
def test_a_rerun_of_a_finished_run_says_so_and_changes_nothing(run: Path, overrides, caplog):
    """The same command (the documented way to continue a run) or a lower max_steps: one line
    saying the run is done and how to go on; metrics.json, checkpoints, grids, logs as they
    were (it was rewritten as {"step": 4}); the returned metrics are the saved ones."""
    before = snapshot(run)
    with caplog.at_level(logging.INFO, logger="ddpm"):
        result = train_in(run, *overrides)
    assert snapshot(run) == before
    lines = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert lines[0].startswith("this run already finished at step 4 (last.ckpt, trainer.max_steps=")
    assert "nothing trained, nothing changed" in lines[0]
    assert lines[0].endswith("To train it further, rerun with a higher trainer.max_steps")
    assert result["val/bpd"] == metrics(run)["val/bpd"]
    assert not (run / LOCK_NAME).exists()


def test_continuing_to_more_steps_merges_the_metrics(run: Path):
    """A higher max_steps trains on and updates metrics.json; a metric this part does not log
    again (here a test/bpd of the earlier part) keeps its earlier value. last.ckpt is the new
    state, not a last-v1.ckpt beside a stale one (the copied run's state names the old path)."""
    earlier = {**metrics(run), "test/bpd": 1.25}
    (run / "metrics.json").write_text(json.dumps(earlier))
    result = train_in(run, "trainer.max_steps=6")
    now = metrics(run)
    assert now["step"] == 6 and now["test/bpd"] == 1.25 and result["test/bpd"] == 1.25
    assert set(earlier) <= set(now) and now["val/bpd"] != earlier["val/bpd"]
    ckpts = run / "checkpoints"
    assert not list(ckpts.glob("last-v*.ckpt"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_run_that_max_time_ended_continues_when_run_again(run: Path):
    """trainer.max_time is each launch's: the checkpoint of a launch that used up its time (as
    Lightning's Timer records it) continues when rerun, as the STOPPED EARLY warning says
    (Lightning's Timer restored the used time and stopped the rerun at its first step)."""
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    used = {"time_elapsed": {"train": 1e6, "sanity_check": 0.0, "validate": 0.0, "test": 0.0}}
    ckpt["callbacks"] |= {"Timer": used, "LaunchTimer": used}
    torch.save(ckpt, last)
    train_in(run, "trainer.max_steps=6", "trainer.max_time=00:00:10:00")
    assert metrics(run)["step"] == 6


@pytest.mark.slow  # two train.py processes; the same code path as the in-process reruns
def test_a_rerun_finished_sweep_keeps_its_table(tmp_path: Path):
    """`-m` twice into the same sweep directory: the second reruns finished jobs, which keep
    their metrics, so `python -m ddpm.results` still has its metric columns."""
    from ddpm.cli.results import main

    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, "seed=0", f"hydra.sweep.dir={sweep}"]
    run_script("train.py", *args)
    (job,) = sweep.glob("*/metrics.json")
    first = job.read_bytes()
    rerun = run_script("train.py", *args)
    assert "this run already finished at step 4" in rerun.stdout + rerun.stderr
    assert job.read_bytes() == first
    table = main([str(sweep), "--out", str(tmp_path / "table")])
    assert "val/bpd" in table.splitlines()[0]


def test_results_name_runs_whose_metrics_an_older_rerun_emptied(run: Path, capsys):
    """Sweeps rerun before this fix hold metrics.json files of {"step": N}: named, not a table
    silently without metric columns."""
    from ddpm.cli.results import main

    (run / "metrics.json").write_text('{"step": 4}')
    main([str(run.parent), "--out", str(run.parent / "table")])
    assert f"WARNING: {run}/metrics.json holds no metrics" in capsys.readouterr().err


def test_a_second_launch_into_a_running_directory_is_refused(run: Path):
    """While another live process holds the run directory (here this test process), train.py
    into it is one line naming the directory and the holder, and changes nothing."""
    before = snapshot(run)
    lock = runlock.acquire(run)
    try:
        proc = run_script(
            "train.py", *FAST, "trainer.max_steps=6", f"hydra.run.dir={run}", check=False
        )
    finally:
        runlock.release(lock)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: the run directory {run} is in use by another training run ")
    assert f"(pid {os.getpid()} on {socket.gethostname()}" in last
    assert snapshot(run) == before
    # refused before Hydra wrote this launch's overrides over the running job's
    assert "trainer.max_steps=6" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert not lock.exists()


def test_the_lock_is_released_on_errors_and_a_stale_one_is_taken_over(run: Path, caplog):
    """A refused resume (an exception inside the lock) leaves no lock; a lock whose process is
    gone (a dead pid, or a live pid that started later: reused) is removed with a warning."""
    with pytest.raises(CheckpointError):
        train_in(run, "trainer.max_steps=6", "module.optimizer.lr=1e-3")
    assert not (run / LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    for holder in (
        {"pid": dead.pid, "host": host},
        {"pid": os.getpid(), "host": host, "start": "1"},
    ):
        (run / LOCK_NAME).write_text(json.dumps(holder))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ddpm"):
            train_in(run)  # finished: returns at once
        assert f"removed the stale lock {run / LOCK_NAME}" in caplog.text
        assert not (run / LOCK_NAME).exists()


def test_a_slower_takeover_of_a_stale_lock_leaves_the_new_holders_lock(tmp_path: Path):
    """Two launches after a crash both read the stale holder; the first takes the lock over.
    The second, acting on what it read, must not delete the first one's fresh lock."""
    path = tmp_path / LOCK_NAME
    stale = {"pid": 1, "host": "elsewhere", "since": "long ago"}
    fresh = {"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}
    path.write_text(json.dumps(fresh))  # the first launch took over already
    runlock._take_over(path, stale)  # the second, with its stale read
    assert json.loads(path.read_text()) == fresh
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
    path.write_text(json.dumps(stale))  # alone: the stale lock goes
    runlock._take_over(path, stale)
    assert not list(tmp_path.iterdir())


def test_the_lock_of_another_host_is_refused_and_ddp_children_skip_it(tmp_path, monkeypatch):
    """A live holder on another machine (its heartbeat recent) is refused, saying to delete the
    file if it is gone; one silent for STALE_AFTER_S, or of this same SLURM job (requeued onto
    another node), is stale. Ranks 1.. of a DDP run (LOCAL_RANK set by Lightning's launcher)
    never wait on it; the holder's heartbeat keeps the file fresh."""
    path = tmp_path / LOCK_NAME
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "job": "77"}))
    with pytest.raises(RunLocked, match=r"\(pid 1 on elsewhere; lock file .*delete the lock file"):
        runlock.acquire(tmp_path)
    for key, value in (("LOCAL_RANK", "1"), ("NODE_RANK", "1"), ("RANK", "3")):
        monkeypatch.setenv(key, value)
        with runlock.run_lock(tmp_path) as held:
            assert held is None
        monkeypatch.delenv(key)
    with pytest.raises(RunLocked), runlock.run_lock(tmp_path):  # the first process takes it
        pass
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued: its earlier run is gone
    runlock.release(runlock.acquire(tmp_path))
    assert not path.exists()
    monkeypatch.delenv("SLURM_JOB_ID")
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    silent = path.stat().st_mtime - runlock.STALE_AFTER_S - 1
    os.utime(path, (silent, silent))
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with runlock.run_lock(tmp_path) as held:
        os.utime(held, (silent, silent))
        time.sleep(0.3)
        assert time.time() - held.stat().st_mtime < 5  # touched by the heartbeat
    assert not path.exists()


def test_a_changed_learning_rate_is_refused_or_applied(run: Path):
    """The checkpoint's optimizer state would silently keep the old rate while run.json records
    the new one: refused naming it (nothing changed); with resume_changes=allow the new rate
    applies, through the LR schedule, as if the run had used it from the start."""
    before = snapshot(run)
    with pytest.raises(CheckpointError) as info:
        train_in(run, "trainer.max_steps=6", "module.optimizer.lr=1e-3")
    assert "module.optimizer.lr=0.002 (this run: 0.001)" in str(info.value)
    assert "resume_changes=allow" in str(info.value)
    assert snapshot(run) == before
    train_in(run, "trainer.max_steps=6", "module.optimizer.lr=1e-3", "resume_changes=allow")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [1e-3] and group["initial_lr"] == 1e-3
    # LinearLR of the quickstart (start_factor 0.01 over 100 steps) at step 6, from 1e-3
    assert group["lr"] == pytest.approx(1e-3 * (0.01 + 0.99 * 6 / 100))
    assert json.loads((run / "run.json").read_text())["lr"] == 1e-3


def test_resuming_onto_another_dataset_is_refused(run: Path):
    """Checkpoints record their dataset: another one on resume is refused like another noise
    schedule (before any data is read: mnist is not even downloaded here)."""
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"dataset.name='mnist5k' \(this run: 'mnist'\)"):
        train_in(run, "trainer.max_steps=6", "dataset.name=mnist")
    assert snapshot(run) == before


@pytest.mark.parametrize("target", ["missing.ckpt", "step_0000002.ckpt"])
def test_last_ckpt_symlinks_neither_block_nor_go_stale(run: Path, target: str, caplog):
    """A dangling last.ckpt symlink is skipped with a warning (it made resume=auto fail); a
    link to an older checkpoint is replaced by the new last.ckpt (not left stale beside a
    last-v1.ckpt), and the file it named is left alone."""
    ckpts = run / "checkpoints"
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").symlink_to(target)
    older = (ckpts / "step_0000002.ckpt").read_bytes()
    with caplog.at_level(logging.WARNING, logger="ddpm"):
        train_in(run, "trainer.max_steps=6")
    if target == "missing.ckpt":
        assert f"ignoring {ckpts / 'last.ckpt'}: a symlink to missing.ckpt" in caplog.text
    last = ckpts / "last.ckpt"
    assert not last.is_symlink() and not list(ckpts.glob("last-v*.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert (ckpts / "step_0000002.ckpt").read_bytes() == older


def test_the_writability_probe_leaves_no_file(tmp_path: Path, monkeypatch):
    """The writability check's probe is removed, also when the write fails after creating it
    (a full disk)."""
    check_output_dir(tmp_path, "hydra.run.dir")
    assert not list(tmp_path.iterdir())
    real = tempfile.TemporaryFile

    class FullDisk:
        def __init__(self, **kwargs):
            self.file = real(**kwargs)  # created in the folder, as on a full disk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", FullDisk)
    with pytest.raises(PermissionError, match="No space left on device"):
        check_output_dir(tmp_path, "hydra.run.dir")
    assert not list(tmp_path.iterdir())


def test_finished_is_max_steps_or_with_max_steps_minus_one_max_epochs():
    """What counts as nothing left to train: the checkpoint's step reached trainer.max_steps,
    or its completed epochs trainer.max_epochs (either ends a run); a run ended by max_time
    alone (neither) always continues."""
    from omegaconf import OmegaConf

    from ddpm.run.resume import finished_step

    def ckpt(step: int, epochs: int) -> dict:
        progress = {"current": {"processed": epochs}}
        return {"global_step": step, "loops": {"fit_loop": {"epoch_progress": progress}}}

    def trainer(**kw) -> object:
        return OmegaConf.create(kw)

    assert finished_step(ckpt(4, 0), trainer(max_steps=4)) == 4
    assert finished_step(ckpt(4, 0), trainer(max_steps=2)) == 4
    assert finished_step(ckpt(4, 0), trainer(max_steps=6)) is None
    assert finished_step(ckpt(40, 3), trainer(max_steps=-1, max_epochs=3)) == 40
    assert finished_step(ckpt(40, 2), trainer(max_steps=-1, max_epochs=3)) is None
    assert finished_step(ckpt(40, 9), trainer(max_steps=-1, max_epochs=-1)) is None
    assert finished_step(ckpt(40, 9), trainer(max_steps=-1, max_time="00:01:00:00")) is None
    assert finished_step(ckpt(40, 3), trainer(max_steps=100, max_epochs=3)) == 40
    assert finished_step(ckpt(40, 2), trainer(max_steps=100, max_epochs=None)) is None


@pytest.mark.slow  # two DDP runs of 2 processes each
def test_ddp_children_neither_wait_on_the_lock_nor_record_a_resume(tmp_path: Path):
    """trainer=ddp_cpu: rank 1 reruns the job into the locked directory and must not be
    refused; continuing writes one config.resume1.yaml (rank 1 wrote a second one), merges
    metrics.json, and leaves no lock; a rerun of the finished DDP run changes nothing."""
    run = tmp_path / "ddp"
    args = [*FAST, "trainer=ddp_cpu", f"hydra.run.dir={run}"]
    run_script("train.py", *args)
    run_script("train.py", *args, "trainer.max_steps=6")
    assert sorted(p.name for p in run.glob("config*.yaml")) == [
        "config.resume1.yaml",
        "config.yaml",
    ]
    assert metrics(run)["step"] == 6 and "val/bpd" in metrics(run)
    assert not (run / LOCK_NAME).exists()
    before = snapshot(run)
    rerun = run_script("train.py", *args, "trainer.max_steps=6")
    assert "this run already finished at step 6" in rerun.stdout + rerun.stderr
    assert snapshot(run) == before
