"""Every dataset read by the real loading code from tiny copies in its real on-disk format.

The copies (written by fakes.py) hold an asymmetric pattern (a bright top-left corner and a
bar down the left side), so a transposed, flipped or mirrored read is caught.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import _fake_emnist, _fake_ffhq, fake_mnist, pattern, write_idx, write_png
from PIL import Image

from ddpm.data.datamodule import ImageDataModule
from ddpm.data.loaders import load_cifar10, load_emnist, load_mnist, load_stl10


def assert_upright(images: torch.Tensor) -> None:
    """The pattern is the right way up (bright top-left) and not mirrored (dark right side)."""
    q = images.shape[-1] // 4
    top_left = images[..., :q, :q].float().mean()
    assert top_left > 200, top_left
    assert images[..., -q:, -q:].float().mean() < 10  # bottom-right is dark
    assert images[..., :q, -q:].float().mean() < 10  # top-right is dark (no mirror)
    bar = max(1, images.shape[-1] // 16)  # the inner half of the bar survives resizing
    assert images[..., -q:, :bar].float().mean() > 100  # the left bar runs all the way down


def test_mnist_idx_files(tmp_path: Path):
    fake_mnist(tmp_path)
    data = load_mnist(tmp_path, download=False)
    assert data.images.shape == (6, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert_upright(data.images)


def test_emnist_letters_come_out_upright_with_names(tmp_path: Path):
    raw = tmp_path / "EMNIST" / "raw"
    # EMNIST stores every image transposed
    stored = np.stack([pattern(28)[0].T for _ in range(4)])
    write_idx(raw / "emnist-letters-train-images-idx3-ubyte", stored)
    write_idx(raw / "emnist-letters-train-labels-idx1-ubyte", np.array([1, 2, 26, 8]))
    data = load_emnist(tmp_path, download=False, subset="letters")
    assert_upright(data.images)
    assert data.labels.tolist() == [0, 1, 25, 7]
    assert [data.class_names[i] for i in data.labels] == ["a", "b", "z", "h"]


def test_emnist_balanced_names(tmp_path: Path):
    raw = tmp_path / "EMNIST" / "raw"
    write_idx(raw / "emnist-balanced-train-images-idx3-ubyte", np.stack([pattern(28)[0].T] * 2))
    write_idx(raw / "emnist-balanced-train-labels-idx1-ubyte", np.array([0, 46]))
    data = load_emnist(tmp_path, download=False, subset="balanced")
    assert len(data.class_names) == 47 and data.class_names[0] == "0"
    assert data.class_names[46] == "t"


def test_cifar10_batches(fake_cifar: Path):
    data = load_cifar10(fake_cifar, download=False)
    assert data.images.shape == (15, 3, 32, 32)
    assert data.labels.tolist()[:3] == [0, 3, 9]
    assert data.class_names[9] == "class9"
    assert_upright(data.images[:, 0])
    assert data.images[:, 1:].max() == 0  # green and blue empty: channels not mixed up


def test_cifar10_corrupt_batch_is_named(fake_cifar: Path):
    path = fake_cifar / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="data_batch_3 is corrupt"):
        load_cifar10(fake_cifar, download=False)


def test_stl10_splits(fake_stl10: Path):
    unlabeled = load_stl10(fake_stl10, download=False, split="unlabeled")
    assert unlabeled.images.shape == (4, 3, 96, 96) and unlabeled.labels is None
    assert_upright(unlabeled.images)
    train = load_stl10(fake_stl10, download=False, split="train")
    assert train.labels.tolist() == [0, 4, 9] and train.class_names[0] == "c0"
    both = load_stl10(fake_stl10, download=False, split="train+unlabeled")
    assert both.labels.tolist() == [0, 4, 9, -1, -1, -1, -1]


def test_stl10_unlabeled_become_the_null_class(fake_stl10: Path):
    dm = ImageDataModule(
        name="stl10",
        data_dir=str(fake_stl10),
        split="train+unlabeled",
        image_size=48,
        channels=3,
        num_classes=10,
        batch_size=2,
        val_fraction=0.0,
    )
    dm.setup()
    assert sorted(dm.train_set.labels.tolist()) == [0, 4, 9, 10, 10, 10, 10]
    assert dm.train_set.images.shape[-1] == 48
    assert_upright(dm.train_set.images)


def test_folder_with_classes_resized_and_cropped(tmp_path: Path):
    root = tmp_path / "pics"
    for cls in ("cat", "dog"):
        for k in range(3):
            write_png(root / cls / f"{k}.png", pattern(64, 3))
    wide = np.zeros((3, 64, 96), dtype=np.uint8)  # wider than tall: centre-cropped
    wide[:, :, 16:80] = pattern(64, 3)
    write_png(root / "dog" / "wide.png", wide)
    dm = ImageDataModule(
        name="folder",
        data_dir=str(root),
        image_size=32,
        channels=3,
        num_classes=2,
        batch_size=2,
        val_fraction=0.0,
    )
    dm.setup()
    assert dm.class_names == ["cat", "dog"]
    assert dm.train_set.images.shape == (7, 3, 32, 32)
    assert sorted(dm.train_set.labels.tolist()) == [0, 0, 0, 1, 1, 1, 1]
    assert_upright(dm.train_set.images)


def test_zip_of_grayscale_pngs_as_rgb(tmp_path: Path):
    path = tmp_path / "faces.zip"
    with zipfile.ZipFile(path, "w") as z:
        for k in range(3):
            png = tmp_path / f"{k}.png"
            write_png(png, pattern(128, 1))
            z.write(png, f"00000/{k:05d}.png")
    dm = ImageDataModule(
        name="ffhq",
        data_dir=str(path),
        image_size=64,
        channels=3,
        num_classes=None,
        batch_size=1,
        val_fraction=0.0,
    )
    dm.setup()
    # numbered FFHQ subfolders are not classes
    assert dm.train_set.images.shape == (3, 3, 64, 64)
    assert_upright(dm.train_set.images)


def test_broken_image_is_named_or_skipped(tmp_path: Path):
    root = tmp_path / "pics"
    for k in range(4):
        write_png(root / f"{k}.png", pattern(32, 3))
    good = (root / "0.png").read_bytes()
    (root / "broken.png").write_bytes(good[: len(good) // 3])
    options = dict(
        name="folder",
        data_dir=str(root),
        image_size=32,
        channels=3,
        num_classes=None,
        batch_size=1,
        val_fraction=0.0,
    )
    with pytest.raises(ValueError, match=r"broken\.png.*dataset\.skip_bad=true"):
        ImageDataModule(**options).setup()
    dm = ImageDataModule(**options, skip_bad=True)
    with pytest.warns(UserWarning, match="skipped 1 unreadable images of 5"):
        dm.setup()
    assert len(dm.train_set) == 4


def test_zip_without_images_is_named(tmp_path: Path):
    path = tmp_path / "empty.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "no pictures here")
    with pytest.raises(ValueError, match=r"empty\.zip holds no images"):
        ImageDataModule(name="folder", data_dir=str(path), image_size=32, channels=3).setup()


@pytest.mark.parametrize(
    ("name", "fix"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("emnist", "EMNIST/raw/emnist-letters-train"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("stl10", "stl10_binary/train_X.bin"),
    ],
)
def test_missing_dataset_names_directory_and_download(tmp_path: Path, name: str, fix: str):
    with pytest.raises(FileNotFoundError, match="dataset.download=true") as err:
        ImageDataModule(name=name, data_dir=str(tmp_path / "nothing"), subset="letters").load()
    assert str(tmp_path / "nothing") in str(err.value) and fix in str(err.value)


def test_missing_folder_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no image folder or .zip at"):
        ImageDataModule(
            name="ffhq", data_dir=str(tmp_path / "ffhq"), image_size=64, channels=3
        ).load()


def test_truncated_idx_file_is_named(tmp_path: Path):
    fake_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RuntimeError, match="train-images-idx3-ubyte is truncated"):
        load_mnist(tmp_path, download=False)


def test_channel_and_class_mismatch_are_named(tmp_path: Path):
    fake_mnist(tmp_path)
    with pytest.raises(ValueError, match="set dataset.channels=1"):
        ImageDataModule(name="mnist", data_dir=str(tmp_path), channels=3, image_size=28).load()
    with pytest.raises(ValueError, match="dataset.num_classes=3; set it to 6"):
        ImageDataModule(name="mnist", data_dir=str(tmp_path), num_classes=3).load()
    write_png(tmp_path / "faces" / "0.png", pattern(16, 3))
    with pytest.raises(ValueError, match="has no labels but dataset.num_classes=10"):
        ImageDataModule(
            name="ffhq", data_dir=str(tmp_path / "faces"), image_size=8, channels=3
        ).load()
    with pytest.raises(ValueError, match="dataset.subset='letterz'"):
        ImageDataModule(name="emnist", data_dir=str(tmp_path), subset="letterz").load()


def test_flips_only_when_asked_and_only_in_training(tmp_path: Path):
    fake_mnist(tmp_path, n=64)
    batch = (torch.from_numpy(np.stack([pattern(28)] * 64)), torch.zeros(64, dtype=torch.long))

    class Training:
        training = True

    dm = ImageDataModule(name="mnist", data_dir=str(tmp_path), hflip=True)
    dm.trainer = Training()
    x, _ = dm.on_after_batch_transfer(batch, 0)
    mirrored = (x[:, 0, 0, -1] > 0).sum().item()  # bright top-right: flipped
    assert 10 < mirrored < 54  # about half
    dm.hflip = False
    x, _ = dm.on_after_batch_transfer(batch, 0)
    assert (x[:, 0, 0, -1] > 0).sum().item() == 0


@pytest.mark.parametrize(
    ("name", "make", "extra"),
    [
        ("mnist", lambda r: fake_mnist(r, n=40), []),
        ("emnist", _fake_emnist, []),
        ("ffhq", _fake_ffhq, ["dataset.image_size=32"]),
    ],
)
@pytest.mark.slow
def test_train_py_runs_on_each_dataset_config(tmp_path: Path, name, make, extra):
    from conftest import FAST, run_script

    make(tmp_path)
    run_dir = tmp_path / "run"
    run_script(
        "train.py",
        *FAST,
        f"dataset={name}",
        f"paths.data_dir={tmp_path}",
        "dataset.batch_size=8",
        f"hydra.run.dir={run_dir}",
        *extra,
    )
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    net = ckpt["hyper_parameters"]["net"]
    assert net["in_channels"] == (3 if name == "ffhq" else 1)
    assert net["num_classes"] == {"mnist": 10, "emnist": 26, "ffhq": None}[name]


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_cifar10_and_stl10_configs_set_up(name, fake_cifar, fake_stl10, tmp_path):
    from conftest import compose_config
    from hydra.utils import instantiate

    root = fake_cifar if name == "cifar10" else fake_stl10
    overrides = [f"dataset={name}", f"paths.data_dir={root}", "dataset.val_fraction=0"]
    cfg = compose_config([*overrides, "dataset.batch_size=2"])
    dm = instantiate(cfg.dataset)
    dm.setup()
    images = dm.train_set.images
    assert images.shape[1:] == (3, cfg.dataset.image_size, cfg.dataset.image_size)
    assert dm.hflip  # the papers flip these datasets
    assert_upright(images[:, 0])


def test_one_image_file_decodes_like_a_folder(tmp_path):
    from ddpm.data.folder import load_image

    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, :, 0] = 200
    Image.fromarray(rgb).save(tmp_path / "a.png")
    gray = load_image(tmp_path / "a.png", 28, 1)
    colour = load_image(tmp_path / "a.png", 16, 3)
    assert gray.shape == (1, 1, 28, 28) and gray.dtype == torch.uint8
    assert colour.shape == (1, 3, 16, 16) and colour[0, 0].float().mean() == 200
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read the image .*bad\.png"):
        load_image(tmp_path / "bad.png", 28, 1)


def test_val_split_trains_on_all_of_the_training_split(fake_cifar: Path):
    """dataset.val_split=test, val_fraction=0: all 15 training images train, the 3 test images
    validate (DDPM trained on all 50,000 CIFAR-10 images and reported NLL on the test set)."""
    dm = ImageDataModule(
        name="cifar10",
        data_dir=str(fake_cifar),
        image_size=32,
        channels=3,
        batch_size=4,
        val_fraction=0.0,
        val_split="test",
    )
    dm.setup("fit")
    assert len(dm.train_set) == 15 and len(dm.val_set) == 3
    assert dm.val_set.labels.tolist() == [0, 3, 9]
    with pytest.raises(ValueError, match="dataset.val_split=test validates on another split"):
        ImageDataModule(name="cifar10", val_fraction=0.02, val_split="test")


def test_fontletters_are_emnist_like_letters(tmp_path, monkeypatch):
    """The offline letters: 26 classes a..z (upper and lower case in one), upright white-on-
    black 28x28 glyphs centred like EMNIST's, drawn once per seed and cached per user."""
    from ddpm.data.loaders import load_fontletters

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    letters = tmp_path / "home-cache" / "ddpm" / "fontletters"

    data = load_fontletters(tmp_path, per_class=6)
    assert data.images.shape == (156, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.class_names[0] == "a" and data.class_names[-1] == "z"
    assert torch.equal(torch.bincount(data.labels), torch.full((26,), 6))
    ink = data.images.float() / 255
    assert ink[:, :, :3].mean() < 0.02 and ink[:, :, :, :3].mean() < 0.02  # black margins
    assert ink.mean() > 0.08  # strokes, not empty images
    # upright, not transposed or flipped: every upper-case 'T' (even images of a class are
    # upper case) has its widest row, the bar, in its upper half; every 'L' in its lower half
    widest = ink[:, 0].sum(2).argmax(1)
    upper = torch.arange(len(ink)) % 2 == 0
    t, L = upper & (data.labels == 19), upper & (data.labels == 11)
    assert (widest[t] < 14).all() and (widest[L] >= 14).all()
    again = load_fontletters(tmp_path, per_class=6)
    assert torch.equal(again.images, data.images)
    assert len(list(letters.glob("*.pt"))) == 1
    test = load_fontletters(tmp_path, split="test", per_class=6)
    assert not torch.equal(test.images, data.images)
    # capitals only: a cache of its own; every 'T' has its bar on top, every 'L' at the bottom
    upper = load_fontletters(tmp_path, per_class=6, subset="upper")
    widest = (upper.images.float() / 255)[:, 0].sum(2).argmax(1)
    assert (widest[upper.labels == 19] < 14).all() and (widest[upper.labels == 11] >= 14).all()
    assert len(list(letters.glob("*.pt"))) == 3
    with pytest.raises(ValueError, match="dataset.subset=digits is not a fontletters subset"):
        load_fontletters(tmp_path, per_class=6, subset="digits")
    # a cut cache file is kept aside for a look and the set drawn again
    cache = next(letters.glob("letters-v1-6-0.pt"))
    cache.write_bytes(cache.read_bytes()[:100])
    assert torch.equal(load_fontletters(tmp_path, per_class=6).images, data.images)
    assert cache.with_name(cache.name + ".corrupt").is_file()
