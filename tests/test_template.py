"""What users of lightning-hydra-template reach for: tags, ckpt_path, test=true,
callbacks=none, the debug configs, trainer keys without `+`, a config tree, conf/local/."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import CONF, FAST, ROOT, compose_config, run_script, tiny_fid
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddpm.cli.train import print_config_tree
from ddpm.run.resume import resume_setting


def test_tags_go_to_the_wandb_logger():
    cfg = compose_config(["logger=wandb", "tags=[cifar,baseline]"])
    assert list(cfg.logger.wandb.tags) == ["cifar", "baseline"]


def test_trainer_keys_need_no_plus():
    cfg = compose_config(["trainer.accumulate_grad_batches=4", "trainer.max_epochs=3"])
    assert cfg.trainer.accumulate_grad_batches == 4 and cfg.trainer.max_epochs == 3


def test_ckpt_path_is_resume_path():
    cfg = compose_config(["ckpt_path=runs/a/checkpoints/last.ckpt"])
    assert resume_setting(cfg) == "runs/a/checkpoints/last.ckpt"
    assert resume_setting(compose_config(["resume=null"])) is None
    with pytest.raises(ValueError, match="ckpt_path=x.ckpt and resume=y.ckpt both say"):
        resume_setting(compose_config(["ckpt_path=x.ckpt", "resume=y.ckpt"]))


def test_callbacks_none_has_no_callbacks():
    cfg = compose_config(["callbacks=none", "experiment=mnist_minimal"])
    # what experiments and debug configs set is left without a _target_: nothing is built
    assert not [c for c in (cfg.callbacks or {}).values() if c and "_target_" in c]


def test_debug_configs_compose():
    from lightning.pytorch.profilers import SimpleProfiler

    from ddpm.cli.train import build

    assert compose_config(["debug=overfit"]).trainer.overfit_batches == 1
    limit = compose_config(["debug=limit"]).trainer
    assert limit.limit_train_batches == 10 and limit.limit_val_batches == 2
    profiler = compose_config(["debug=profiler"]).trainer.profiler
    assert isinstance(build(profiler), SimpleProfiler)


def test_config_tree_names_every_group(capsys):
    cfg = compose_config()
    print_config_tree(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))  # as a job's
    out = capsys.readouterr().out
    for key in ("dataset", "model", "trainer", "callbacks", "max_steps:"):
        assert key in out


def test_local_config_is_applied_and_untracked(tmp_path: Path):
    """conf/local/default.yaml (the user's paths) overrides the defaults, and git ignores it
    while the example stays tracked."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\npaths:\n  data_dir: /datasets\n  log_dir: /scratch/runs\n"
    )
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose("config", overrides=["paths.data_dir=/elsewhere"])
    assert cfg.paths.log_dir == "/scratch/runs"
    assert cfg.paths.data_dir == "/elsewhere"  # the command line still wins
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        assert compose("config").paths.log_dir == "runs"  # optional: none, no error

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("conf/local/default.yaml") and not ignored("conf/local/example.yaml")
    OmegaConf.load(CONF / "local" / "example.yaml")  # the example parses


@pytest.mark.slow
def test_tags_and_test_stage(tmp_path: Path):
    """tags=[...] reach run.json; test=true adds test/loss, test/bpd and, with callbacks=fid,
    FID and KID (of the checkpoint written last) to metrics.json; the config tree is printed."""
    run = tmp_path / "run"
    proc = run_script(
        "train.py",
        *FAST,
        *tiny_fid(tmp_path / "cache"),
        f"hydra.run.dir={run}",
        "tags=[a,b]",
        "test=true",
    )
    assert json.loads((run / "run.json").read_text())["tags"] == ["a", "b"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/bpd"] > 0 and metrics["test/loss"] > 0 and metrics["step"] == 4
    # mnist5k has no test split: its held-out digits, and the training set's statistics
    assert metrics["test/fid70_train_ddpm2"] > 0 and metrics["test/kid70_train_ddpm2"] > 0
    assert "── trainer" in proc.stdout and "max_steps: 4" in proc.stdout


@pytest.mark.slow
def test_ckpt_path_continues_from_that_file_without_callbacks(trained_run: Path, tmp_path: Path):
    source = trained_run / "checkpoints" / "last.ckpt"
    run = tmp_path / "next"
    proc = run_script(
        "train.py",
        *FAST,
        f"hydra.run.dir={run}",
        f"ckpt_path={source}",
        "trainer.max_steps=6",
        "print_config=false",
        "callbacks=none",
    )
    assert f"resuming from {source}" in proc.stdout
    assert "── trainer" not in proc.stdout
    assert json.loads((run / "metrics.json").read_text())["step"] == 6
    assert not (run / "samples").exists() and not (run / "loss_curve.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("debug", ["overfit", "limit", "profiler"])
def test_debug_configs_run(debug: str, tmp_path: Path):
    run = tmp_path / debug
    run_script(
        "train.py",
        f"debug={debug}",
        "model=tiny",
        "trainer.max_steps=3",
        "+trainer.enable_progress_bar=false",
        "print_config=false",
        f"hydra.run.dir={run}",
    )
    assert json.loads((run / "metrics.json").read_text())["step"] == 3
    if debug == "profiler":
        assert any(run.glob("*profile*.txt"))
