"""train.py and sample.py run as a user runs them, as subprocesses."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, FAST, compose_config, run_script
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image


def test_train_writes_run_directory(trained_run: Path):
    ckpts = trained_run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert (ckpts / "step_0000002.ckpt").is_file() and (ckpts / "step_0000004.ckpt").is_file()
    assert (trained_run / "config.yaml").is_file()
    assert "${" not in (trained_run / "config.yaml").read_text()  # resolved
    assert (trained_run / "loss_curve.png").stat().st_size > 1000
    # debug=fast keeps the quickstart's class-conditional model: 4 images of 28 px, one class
    # per column (10 columns, so one row of 4), padding 2
    grid = Image.open(trained_run / "samples" / "final.png")
    assert grid.size == (2 + 4 * 30, 2 + 30) and grid.mode == "L"
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    with open(trained_run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    assert all(float(r["val/bpd"]) > 0 for r in rows if r.get("val/bpd"))  # the bound, logged
    assert any(r.get("val/bpd") for r in rows)
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert lrs and lrs[-1] > lrs[0]  # the warm-up raises the learning rate


@pytest.mark.slow
def test_resume_continues_at_saved_step(trained_run: Path, tmp_path: Path):
    resumed = tmp_path / "resumed"
    run_script(
        "train.py",
        *FAST,
        f"hydra.run.dir={resumed}",
        "trainer.max_steps=6",
        f"resume={trained_run / 'checkpoints' / 'last.ckpt'}",
    )
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    with open(resumed / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps and min(steps) >= 4, steps  # no step was trained twice
    # the loss history of the first run travels in the checkpoint
    history = ckpt["callbacks"]["LossCurve"]["steps"]
    assert history[:4] == [1, 2, 3, 4] or history[0] <= 4 < history[-1]


def test_sample_writes_grid_and_images(trained_run: Path, tmp_path: Path):
    out = tmp_path / "samples"
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    run_script("sample.py", f"ckpt={ckpt}", "n=5", "batch_size=2", "steps=3", f"out={out}")
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{k:06d}.png" for k in range(5)]
    img = Image.open(pngs[0])
    assert img.size == (28, 28) and img.mode == "L"
    assert (out / "grid.png").is_file()
    # the same seed in one batch of 5 gives the same images: each image has its own noise
    again = tmp_path / "again"
    run_script("sample.py", f"ckpt={ckpt}", "n=5", "batch_size=5", "steps=3", f"out={again}")
    for k in range(5):
        a = np.asarray(Image.open(out / "images" / f"{k:06d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(again / "images" / f"{k:06d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
    # samples already there are never overwritten silently
    proc = run_script("sample.py", f"ckpt={ckpt}", "n=2", "steps=2", f"out={out}", check=False)
    assert proc.returncode != 0 and "already holds samples" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_unknown_option_is_named():
    proc = run_script("train.py", *FAST, "trainer.max_stpes=3", check=False)
    assert proc.returncode != 0
    assert "max_stpes" in proc.stderr


@pytest.mark.slow
def test_missing_checkpoint_is_named(tmp_path: Path):
    missing = tmp_path / "nope" / "last.ckpt"
    proc = run_script("sample.py", f"ckpt={missing}", f"out={tmp_path / 's'}", check=False)
    assert proc.returncode != 0
    assert f"checkpoint not found: {missing}" in proc.stderr
    proc = run_script(
        "train.py", *FAST, f"resume={missing}", f"hydra.run.dir={tmp_path / 'r'}", check=False
    )
    assert proc.returncode != 0 and f"checkpoint not found: {missing}" in proc.stderr


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [
        f"{g}={o}"
        for g in ("dataset", "model", "schedule", "sampler", "trainer", "logger", "callbacks")
        for o in _options(g)
        if (g, o) != ("sampler", "checkpoint")  # sample.py's default, not a training sampler
    ]
    + [f"experiment={o}" for o in _options("experiment")]
    + [f"debug={o}" for o in _options("debug")],
)
def test_every_config_composes_and_builds(override: str):
    extra = {
        # the CIFAR-10 network downsamples 3 times: the 28 px digits are padded to 32
        "model=ddpm_cifar10": ["dataset.image_size=32"],
        "model=adm": ["dataset.image_size=32"],  # improved-diffusion's CIFAR-10 network, alike
        # guided-diffusion's 64 px network at 1/6 of its width (296M parameters at full width)
        "model=adm_imagenet64": [
            "dataset.image_size=64",
            "model.model_channels=32",
            "model.num_head_channels=32",
        ],
        "dataset=folder": ["dataset.data_dir=/tmp/any-folder"],  # a required value
    }.get(override, [])
    cfg = compose_config([override, *extra, "hydra.runtime.output_dir=/tmp/ddpm-compose"])
    module = instantiate(cfg.module)
    if "autoencoder" in cfg.module._target_:  # the first stage of a latent DDPM
        assert module.net.config.sample_size == cfg.dataset.image_size
        instantiate(cfg.dataset)
    elif "Latent" in cfg.dataset._target_:  # a latent DDPM: 32 px images, f = 4 latents
        assert module.net.image_size * 4 == cfg.dataset.image_size
        with pytest.raises(InstantiationException, match="needs autoencoder=PATH"):
            instantiate(cfg.dataset)  # until given its autoencoder
    else:
        assert module.net.image_size == cfg.dataset.image_size
        instantiate(cfg.dataset)
    for cb in (cfg.get("callbacks") or {}).values():
        if cb is not None:  # null: a callback the config turned off
            instantiate(cb)


def test_sample_config_composes():
    cfg = compose_config(["ckpt=x.ckpt"], name="sample")
    # sample.py draws as the checkpoint's final training grid did, unless told otherwise
    assert cfg.n == 64 and cfg.sampler.name == "checkpoint"
    assert cfg.labels == "auto" and cfg.guidance is None
