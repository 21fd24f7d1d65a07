"""Datasets as uint8 tensors in memory, served in batches and scaled to [-1, 1] on the device.

The loaders themselves, one small function per dataset, live in `ddpm.data.loaders`; the
`ImageDataModule` resizes once, splits, batches and augments whatever a loader returns. Decoding
happens once: afterwards a batch is one tensor index, so the loader never starves a GPU.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ddpm.data.loaders import LOADERS, Images

log = logging.getLogger(__name__)


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
    resized = torch.cat([TF.resize(chunk, size, antialias=True) for chunk in images.split(4096)])
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


class EpochSampler(Sampler[int]):
    """This rank's share of a permutation drawn from (seed, epoch) alone, able to start
    mid-epoch.

    Hand-written because an exact resume needs both, and neither torch sampler has them:
    RandomSampler draws each epoch's order from the global RNG, and neither it nor
    DistributedSampler can skip what a killed run already consumed. Lightning calls
    `set_epoch`; `position` counts the indices of this epoch that reached the module
    (ImageDataModule.on_after_batch_transfer advances it), and `resume_at` makes the next
    iteration of that same epoch start there. Rank r takes every W-th index (of the first
    n // W · W of the permutation, so every rank makes the same number of steps).
    """

    def __init__(
        self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        self._resume = (epoch, position)

    def __len__(self) -> int:
        return self.n // self.world_size

    def __iter__(self):
        # a generator: this runs at the first batch, after Lightning's set_epoch
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]  # the saved epoch: continue it (another: it had ended)
        self._resume = None
        self.position = start
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[self.rank : len(self) * self.world_size : self.world_size]
        yield from mine[start:].tolist()


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning saves in checkpoints and restores (it calls `state_dict` /
    `load_state_dict` on loaders that have them): the epoch and how much of it was consumed,
    so a resumed run continues with the very next batch."""

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, EpochSampler):  # overfit_batches replaced it: no order
            return {}
        return {"epoch": self.sampler.epoch, "position": self.sampler.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochSampler) and state:
            self.sampler.resume_at(int(state["epoch"]), int(state["position"]))


class ImageDataModule(L.LightningDataModule):
    """Serves one dataset of `LOADERS` with a fixed train/validation split.

    Batches reach the module as (x, y): x float (B, C, H, W) in [-1, 1], y int64 (B,) labels
    (zeros for unlabelled data; -1, the null class, for STL-10's unlabelled part). Horizontal
    flips, when enabled, are drawn per image on the device.

    `split` chooses the part of the source (train / test, STL-10's unlabeled ...), `subset`
    EMNIST's (letters, balanced, ...); `class_folders` and `skip_bad` apply to image folders.
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
        seed: int = 0,
        split: str = "train",
        val_split: str | None = None,
        subset: str | None = None,
        class_folders: bool = True,
        skip_bad: bool = False,
    ) -> None:
        super().__init__()
        if name not in LOADERS:
            raise ValueError(f"unknown dataset.name {name!r}; known datasets: {sorted(LOADERS)}")
        if batch_size < 1:
            raise ValueError(f"dataset.batch_size must be >= 1, got {batch_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
        if image_size < 1 or channels not in (1, 3):
            raise ValueError(
                "dataset.image_size must be >= 1 and dataset.channels 1 or 3, "
                f"got {image_size} and {channels}"
            )
        self.name, self.data_dir, self.download = name, data_dir, download
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.batch_size, self.val_fraction, self.hflip = batch_size, val_fraction, hflip
        self.num_workers, self.split_seed, self.seed = num_workers, split_seed, seed
        self._train_loader: ResumableLoader | None = None
        self.options = {"split": split, "class_folders": class_folders, "skip_bad": skip_bad}
        # validation on another split of the source (CIFAR-10's test set) instead of images
        # held out of `split`: then training sees all of it, as the papers train
        self.val_split = val_split
        if val_split is not None and val_fraction:
            raise ValueError(
                f"dataset.val_split={val_split} validates on another split: set "
                "dataset.val_fraction=0 (or drop val_split to hold images out of training)"
            )
        if subset is not None:
            self.options["subset"] = subset
        self.class_names: list[str] = []
        self.train_set: TensorImages | None = None
        self.val_set: TensorImages | None = None

    def load(self, split: str | None = None) -> Images:
        """Read the whole dataset (or another `split` of it) at the configured size and channels."""
        options = self.options if split is None else {**self.options, "split": split}
        data = LOADERS[self.name](
            Path(self.data_dir),
            self.download,
            image_size=self.image_size,
            channels=self.channels,
            **options,
        )
        n, c = data.images.shape[:2]
        if n == 0:
            raise ValueError(f"dataset {self.name!r} in {self.data_dir!r} has no images")
        if c != self.channels:
            raise ValueError(
                f"dataset {self.name!r} has {c}-channel images but dataset.channels="
                f"{self.channels} (and the model's in_channels follow it); set dataset.channels={c}"
            )
        if self.num_classes and data.labels is None:
            raise ValueError(
                f"dataset {self.name!r} has no labels but dataset.num_classes={self.num_classes} "
                "asks for a class-conditional model; set dataset.num_classes=null"
            )
        if self.num_classes and data.labels is not None and data.labels.max() >= self.num_classes:
            raise ValueError(
                f"dataset {self.name!r} has {int(data.labels.max()) + 1} classes but "
                f"dataset.num_classes={self.num_classes}; set it to {int(data.labels.max()) + 1}"
            )
        data.images = fit_size(data.images, self.image_size)
        return data

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = self.load()
        self.class_names = data.class_names
        n = len(data.images)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(n * self.val_fraction))
        val, train = order[:n_val], order[n_val:]
        labels = self._labels(data)
        self.train_set = TensorImages(data.images[train], None if labels is None else labels[train])
        self.val_set = TensorImages(data.images[val], None if labels is None else labels[val])
        if self.val_split is not None:
            held = self.load(self.val_split)
            self.val_set = TensorImages(held.images, self._labels(held))
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"dataset {self.name!r} has {len(self.train_set)} training images, fewer than "
                f"dataset.batch_size={self.batch_size}"
            )

    def _labels(self, data: Images) -> Tensor | None:
        if data.labels is None or not self.num_classes:
            return data.labels
        return torch.where(data.labels < 0, self.num_classes, data.labels)  # unlabelled: null

    def _loader(self, dataset: TensorImages, train: bool) -> DataLoader:
        rank, world = 0, 1
        if train and self.trainer is not None:  # validation: every rank sees the whole set
            rank, world = self.trainer.global_rank, self.trainer.world_size
        # the sampler shards over DDP ranks itself (trainer.use_distributed_sampler=false)
        sampler = EpochSampler(len(dataset), self.seed, shuffle=train, rank=rank, world_size=world)
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # each iter() draws a worker seed from this, not from the global RNG (which a
            # resumed run would then draw from at another point than the original)
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=_keep_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.train_set, train=True)
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    @property
    def test_split(self) -> str | None:
        """The source's test split, "test"; None where it has none (mnist5k, image folders)."""
        return "test" if "split" in inspect.signature(LOADERS[self.name]).parameters else None

    def test_dataloader(self) -> DataLoader:
        """train.py test=true: the source's test split; a source without one is tested on its
        held-out validation images, and says so."""
        if self.test_split is None:
            log.warning("dataset %r has no test split: testing on the validation set", self.name)
            return self.val_dataloader()
        held = self.load(self.test_split)
        return self._loader(TensorImages(held.images, self._labels(held)), train=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int):
        images, labels = batch
        if self.trainer is not None and self.trainer.training and self._train_loader is not None:
            self._train_loader.sampler.position += len(images)  # saved in checkpoints
        x = images.float().div_(127.5).sub_(1.0)  # uint8 [0, 255] -> [-1, 1]
        if self.hflip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, labels
