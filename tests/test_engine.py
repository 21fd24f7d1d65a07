"""The training engine's choices: precision by hardware, a checkpoint at the end of training,
the wall-clock guard that says so when it ends a run, and sample.py's checkpoint defaults."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, compose_config, train_config

from ddpm.cli import sample as sampling
from ddpm.cli import train as training
from ddpm.device import autocast, choose_precision, cpu_flags, cpu_has_native_bf16
from ddpm.module import load_module


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert {"avx512f", "avx512_bf16"} <= cpu_flags(info)
    assert cpu_flags(tmp_path / "missing") == set()


def test_bf16_only_where_the_cpu_has_it(monkeypatch):
    mkldnn = torch.backends.mkldnn.is_available()
    assert cpu_has_native_bf16({"avx512f", "avx512_bf16"}) == mkldnn
    assert cpu_has_native_bf16({"amx_bf16"}) == mkldnn
    assert not cpu_has_native_bf16({"avx512f", "avx2"})  # emulated bf16 is slower than fp32
    monkeypatch.setattr("ddpm.device.cpu_has_native_bf16", lambda: True)
    assert choose_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr("ddpm.device.cpu_has_native_bf16", lambda: False)
    assert choose_precision("auto", "cpu") == "32-true"
    # an explicit value is the user's choice, whatever the machine
    assert choose_precision("32-true", "cpu") == "32-true"
    assert choose_precision("bf16-mixed", "cpu") == "bf16-mixed"


def _cfg(run: Path, *extra: str):
    return train_config(run, [*FAST, *extra])


def test_a_run_ending_between_periodic_checkpoints_saves_its_last_step(tmp_path: Path):
    training.train(
        _cfg(tmp_path, "trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=2")
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step_0000002.ckpt", "step_0000003.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_the_guard_that_ends_a_run_says_so(caplog):
    trainer = SimpleNamespace(
        max_steps=800, global_step=595, interrupted=False, default_root_dir="r"
    )
    with caplog.at_level(logging.WARNING):
        training.warn_if_cut_short(trainer, "00:00:08:30")
    assert "STOPPED EARLY" in caplog.text and "step 595 of 800" in caplog.text
    caplog.clear()
    done = SimpleNamespace(max_steps=800, global_step=800, interrupted=False, default_root_dir="r")
    training.warn_if_cut_short(done, "00:00:08:30")
    training.warn_if_cut_short(trainer, None)  # no guard: max_steps ended it
    assert "STOPPED EARLY" not in caplog.text


def test_checkpoint_carries_how_its_grid_was_drawn(trained_run: Path):
    """debug=fast keeps the quickstart's sampling: guided DDPM, the grid's step count."""
    module = load_module(trained_run / "checkpoints" / "last.ckpt")
    assert module.sampling == {
        "sampler": "ddpm",
        "steps": 3,
        "variance": "auto",  # β̃ for a model without learned variances
        "clip_x0": True,
        "guidance": 2.0,
    }


def test_sample_py_defaults_to_the_checkpoint_settings(trained_run: Path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)
    cfg = compose_config([f"ckpt={ckpt}"], name="sample")
    sampler, guidance = sampling.sampling(cfg, module)
    assert sampler == {
        "sampler": "ddpm",
        "steps": 3,
        "variance": "auto",
        "clip_x0": True,
    }
    assert guidance == 2.0 and cfg.use_ema  # EMA weights unless asked otherwise
    labels, nrow = sampling.resolve_labels(cfg, 12, module)
    assert labels == [k % 10 for k in range(12)] and nrow == 10  # one digit per column
    # each default gives way to what is asked for
    cfg = compose_config(
        [f"ckpt={ckpt}", "sampler=ddim", "steps=7", "guidance=0", "labels=null"], name="sample"
    )
    sampler, guidance = sampling.sampling(cfg, module)
    assert sampler["sampler"] == "ddim" and sampler["steps"] == 7 and guidance == 0.0
    assert sampling.resolve_labels(cfg, 12, module) == (None, None)
    cfg = compose_config([f"ckpt={ckpt}", "+sampler.variance=large"], name="sample")
    assert sampling.sampling(cfg, module)[0]["variance"] == "large"
    # a checkpoint from before sampling settings were saved: DDPM over all T, no guidance
    module.sampling = {}
    sampler, guidance = sampling.sampling(compose_config([f"ckpt={ckpt}"], "sample"), module)
    assert sampler["sampler"] == "ddpm" and sampler["steps"] is None and guidance == 0.0


def test_precision_auto_is_resolved_and_logged(tmp_path: Path, caplog, monkeypatch):
    monkeypatch.setattr("ddpm.device.cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO):
        training.train(_cfg(tmp_path, "trainer.max_steps=1"))
    assert "trainer.precision=auto: 32-true" in caplog.text


def test_sampling_precision_is_checked_and_chosen(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="precision must be auto, bf16 or 32, got 'fp8'"):
        autocast("fp8", cpu)
    assert autocast("bf16", cpu)._enabled and not autocast("32", cpu)._enabled
    monkeypatch.setattr("ddpm.device.cpu_has_native_bf16", lambda: False)
    assert not autocast("auto", cpu)._enabled
    monkeypatch.setattr("ddpm.device.cpu_has_native_bf16", lambda: True)
    with autocast("auto", cpu):
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16


def test_skip_mode_runs_to_the_end_with_the_loss_curve_on(tmp_path: Path, caplog):
    """module.nonfinite=skip with every step diverging: each update is dropped by the guard,
    the loss curve records the steps (it crashed on a skipped step's missing loss), and the
    saved weights stay finite (the updates drop, the run does not stop)."""
    cfg = _cfg(
        tmp_path,
        "module.optimizer.lr=1e38",
        "module.nonfinite=skip",
        "callbacks.loss_curve.every_n_steps=2",
        "trainer.max_steps=6",
    )
    with caplog.at_level(logging.WARNING):
        training.train(cfg)
    assert caplog.text.count("update skipped") >= 5
    assert (tmp_path / "loss_curve.png").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
