"""Latent diffusion end to end at test size: an autoencoder trained by train.py, a DDPM on its
cached latents, sample.py from the self-contained checkpoint, and the bad inputs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, compose_config, run_script, train_config
from PIL import Image

from ddpm.autoencoder import load_autoencoder
from ddpm.checkpoint import CheckpointError
from ddpm.cli.eval import evaluate
from ddpm.cli.train import train
from ddpm.data.latents import LatentDataModule
from ddpm.module import load_module

# a 2-level AutoencoderKL (f = 2, c = 2) on 16 px digits: latents of 2x8x8
TINY_AE = [
    "module.net.block_out_channels=[8,16]",
    "module.net.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D]",
    "module.net.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D]",
    "module.net.norm_num_groups=4",
    "module.net.latent_channels=2",
    "dataset.image_size=16",
]
TINY_LATENT = ["model.in_channels=2", "model.image_size=8", "model.ch=16", "dataset.image_size=16"]


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ae") / "run"
    run_script(
        "train.py",
        *FAST,
        "experiment=autoencoder_mnist5k",
        *TINY_AE,
        "trainer.max_steps=4",
        f"hydra.run.dir={run}",
    )
    return run


@pytest.fixture(scope="module")
def latent_run(autoencoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("latent")
    run = root / "run"
    run_script(
        "train.py",
        *FAST,
        "experiment=latent_mnist5k",
        *TINY_LATENT,
        f"autoencoder={autoencoder / 'checkpoints' / 'last.ckpt'}",
        f"dataset.cache_dir={root / 'cache'}",
        f"hydra.run.dir={run}",
    )
    return run


def test_autoencoder_run_writes_its_metrics_and_reconstructions(autoencoder: Path):
    import json

    metrics = json.loads((autoencoder / "metrics.json").read_text())
    assert metrics["val/psnr"] > 0 and metrics["val/latent_std"] > 0
    grid = Image.open(autoencoder / "samples" / "recon_final.png")
    assert grid.mode == "L" and grid.width > 16
    net, info = load_autoencoder(autoencoder / "checkpoints" / "last.ckpt")
    assert info["image_size"] == 16 and net.config.latent_channels == 2


def test_latent_checkpoint_is_self_contained_and_samples(latent_run: Path, tmp_path: Path):
    ckpt = latent_run / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)
    assert any(k.startswith("autoencoder.") for k in raw["state_dict"])
    assert raw["hyper_parameters"]["autoencoder"]["net"]["latent_channels"] == 2
    scale = float(raw["state_dict"]["latent_scale"])
    assert scale > 0 and scale != 1.0  # LDM's scale factor, from the data
    # the autoencoder's own file is not needed any more
    moved = tmp_path / "elsewhere.ckpt"
    source = Path(raw["hyper_parameters"]["autoencoder"]["source"])
    source.rename(moved)
    try:
        module = load_module(ckpt)
        assert module.image_shape == (1, 16, 16)
        out = tmp_path / "s"
        run_script(
            "sample.py",
            f"ckpt={ckpt}",
            "n=4",
            "steps=3",
            "animate=true",
            "noise_levels=true",
            "npz=true",
            f"out={out}",
        )
    finally:
        moved.rename(source)
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (4, 16, 16, 1)  # decoded digits, not latents
    assert Image.open(out / "animation.gif").n_frames == 4  # x_T, then the 3 steps, decoded
    assert Image.open(out / "noise_levels.png").height > 2 * 16


def test_latent_cache_is_keyed_and_rebuilt_when_corrupt(autoencoder: Path, tmp_path: Path):
    ae = autoencoder / "checkpoints" / "last.ckpt"
    options = {"image_size": 16, "batch_size": 8, "cache_dir": str(tmp_path)}
    dm = LatentDataModule(autoencoder=str(ae), **options)
    dm.setup()
    (cache,) = (tmp_path / "latents").glob("*.pt")
    assert dm.train_set.images.shape[1:] == (2, 8, 8)
    std = dm.train_set.images.std().item()
    assert abs(std - 1) < 1e-4  # scaled to unit variance
    again = LatentDataModule(autoencoder=str(ae), **options)
    again.setup()
    assert torch.equal(again.train_set.images, dm.train_set.images)
    assert len(list((tmp_path / "latents").glob("*.pt"))) == 1  # a hit, not a second file
    # another size is another key
    other = LatentDataModule(autoencoder=str(ae), **{**options, "val_fraction": 0.2})
    other.setup()
    assert len(list((tmp_path / "latents").glob("*.pt"))) == 2
    cache.write_bytes(b"truncated")
    rebuilt = LatentDataModule(autoencoder=str(ae), **options)
    rebuilt.setup()
    assert (cache.parent / f"{cache.name}.corrupt").is_file()
    assert torch.equal(rebuilt.train_set.images, dm.train_set.images)


def test_latent_bad_inputs_are_named(autoencoder: Path, latent_run: Path, tmp_path: Path):
    ae = str(autoencoder / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="needs autoencoder=PATH"):
        LatentDataModule(autoencoder=None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        LatentDataModule(autoencoder=str(tmp_path / "missing.ckpt"))
    with pytest.raises(CheckpointError, match="is not an autoencoder checkpoint"):
        load_autoencoder(latent_run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="trained on 16 px images, the dataset is at 32 px"):
        LatentDataModule(autoencoder=ae, image_size=32, cache_dir=str(tmp_path)).setup()
    # in-process (the one-line form of these errors is the entry points' tests' concern):
    # a subprocess each cost ~6 s of interpreter start in the fast tier
    overrides = [*FAST, "experiment=latent_mnist5k", "dataset.image_size=16", "model.image_size=8"]
    cfg = train_config(
        tmp_path / "run", [*overrides, f"autoencoder={ae}", f"dataset.cache_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match="set model.in_channels=2"):
        train(cfg)
    source = latent_run / "checkpoints" / "last.ckpt"
    cfg = compose_config([f"source={source}", "nll=true", "fid=false", "n=2"], name="eval")
    with pytest.raises(ValueError, match="is a latent DDPM"):
        evaluate(cfg)


def test_a_pretrained_diffusers_vae_folder_wraps_into_an_autoencoder_checkpoint(tmp_path: Path):
    """A folder written by AutoencoderKL.save_pretrained (Stable Diffusion's VAE is one) becomes
    a checkpoint that load_autoencoder (weights_only=True) rebuilds with the same outputs."""
    from diffusers import AutoencoderKL

    from ddpm.autoencoder import main

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8), norm_num_groups=4, latent_channels=2, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    main([str(tmp_path / "vae"), str(tmp_path / "vae.ckpt"), "--image-size", "16"])
    net, info = load_autoencoder(tmp_path / "vae.ckpt")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = net.encode(x).latent_dist.mean
        torch.testing.assert_close(mean, vae.encode(x).latent_dist.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net(x).sample, vae(x).sample, rtol=1e-5, atol=1e-6)
    assert info["image_size"] == 16 and info["net"]["latent_channels"] == 2
    before = (tmp_path / "vae.ckpt").read_bytes()
    with pytest.raises(SystemExit):  # argparse's one-line error: the file is kept
        main([str(tmp_path / "vae"), str(tmp_path / "vae.ckpt")])
    assert (tmp_path / "vae.ckpt").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from ddpm.autoencoder import wrap_pretrained

        wrap_pretrained(tmp_path, tmp_path / "other.ckpt")


def test_a_latent_teacher_distills_one_stage(latent_run: Path, autoencoder: Path, tmp_path: Path):
    """Progressive distillation of a latent DDPM (2 -> 1 step, 30 steps of batch 8): the
    student carries the teacher's autoencoder and latent scale, its one step lands nearer the
    guided teacher's two DDIM steps than the teacher's own one step did, and it decodes to
    images."""
    from ddpm.generate import generate_all

    teacher_path = latent_run / "checkpoints" / "last.ckpt"
    run = tmp_path / "distill"
    cfg = train_config(
        run,
        [
            *FAST,
            "experiment=latent_mnist5k",
            *TINY_LATENT,
            f"autoencoder={autoencoder / 'checkpoints' / 'last.ckpt'}",
            f"dataset.cache_dir={latent_run.parent / 'cache'}",
            "logger=none",
            f"teacher={teacher_path}",
            "distill.teacher_steps=2",
            "distill.steps=1",
            "trainer.max_steps=30",
            "trainer.limit_val_batches=0",
            "module.optimizer.lr=3e-3",
            "module.ema_decay=0.5",
        ],
    )
    train(cfg)
    student = load_module(run / "stage_1_1steps" / "checkpoints" / "last.ckpt")
    teacher = load_module(teacher_path)
    assert student.autoencoder is not None
    assert torch.equal(student.latent_scale, teacher.latent_scale)
    for key, value in teacher.autoencoder.state_dict().items():
        assert torch.equal(student.autoencoder.state_dict()[key], value), key
    settings = {"sampler": "ddim", "spacing": "trailing"}
    w = teacher.sampling.get("guidance", 0.0)
    target = generate_all(teacher, 20, sampler={**settings, "steps": 2}, guidance=w, progress=False)
    assert target.shape[1:] == (1, 16, 16)  # decoded digits, not 2x8x8 latents

    def error(module):
        one = generate_all(module, 20, sampler={**settings, "steps": 1}, progress=False)
        return (one - target).square().mean().item()

    before, after = error(teacher), error(student)
    assert after < 0.5 * before, (before, after)
