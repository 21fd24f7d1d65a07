import pytest
import torch

from ddpm.data.datamodule import ImageDataModule, fit_size
from ddpm.data.loaders import load_mnist5k


def test_mnist5k_is_the_real_digits():
    data = load_mnist5k()
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels).tolist() == [500] * 10
    # real digits: dark background, bright strokes covering a minority of pixels
    assert data.images[:, :, 0, :].float().mean() < 5
    assert 0.05 < (data.images > 128).float().mean() < 0.3


def test_datamodule_split_and_batches():
    dm = ImageDataModule(batch_size=16, val_fraction=0.1)
    dm.setup("fit")
    assert len(dm.train_set) == 4500 and len(dm.val_set) == 500
    train_idx = set(map(tuple, dm.train_set.images.flatten(1)[:50].tolist()))
    assert not train_idx & set(map(tuple, dm.val_set.images.flatten(1).tolist()))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.uint8
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and torch.equal(y, labels)
    # every class is in the validation split (the source file is sorted by class)
    assert len(torch.unique(dm.val_set.labels)) == 10


def test_padding_and_resizing():
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    padded = fit_size(x, 32)
    assert padded.shape == (2, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], x) and padded[:, :, :2].sum() == 0
    assert fit_size(x, 16).shape == (2, 1, 16, 16)
    assert fit_size(x, 28) is x


def test_wrong_channels_and_bad_options_are_named():
    with pytest.raises(ValueError, match="dataset.channels=3"):
        ImageDataModule(channels=3).setup("fit")
    with pytest.raises(ValueError, match="unknown dataset.name 'mnist9k'"):
        ImageDataModule(name="mnist9k")
    with pytest.raises(ValueError, match="dataset.batch_size"):
        ImageDataModule(batch_size=0)
