"""Tiny copies of each dataset in its real on-disk format, written by the tests.

Each image holds an asymmetric pattern (a bright top-left corner and a bar down the left
side), so a transposed, flipped or mirrored read is caught. Plain writers are imported by the
tests that need them; the `fake_cifar` and `fake_stl10` fixtures reach every test through
conftest.py.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10, STL10


def pattern(size: int, channels: int = 1, value: int = 255) -> np.ndarray:
    """(channels, size, size) uint8: top-left block and a left bar bright, the rest dark."""
    img = np.zeros((channels, size, size), dtype=np.uint8)
    q = size // 4
    img[:, :, : size // 8] = value // 2
    img[:, :q, :q] = value
    return img


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, n: int = 6) -> None:
    images = np.stack([pattern(28)[0] for _ in range(n)])
    for part in ("train", "t10k"):
        write_idx(root / "MNIST" / "raw" / f"{part}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{part}-labels-idx1-ubyte", np.arange(n) % 10)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pickled batches as CIFAR-10 ships them; torchvision's md5 list points at these files."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    img = pattern(32, 3)
    img[1:] = 0  # red only: channel order is checked too
    flat = img.reshape(1, -1).repeat(3, axis=0)  # rows of 3072: R plane, G plane, B plane
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat, "labels": [0, 3, 9], "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    # tests only: torchvision checks the published md5s; make its list describe our fakes
    monkeypatch.setattr(CIFAR10, "train_list", [[n, _md5(folder / n)] for n in names[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    meta = {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")}
    monkeypatch.setattr(CIFAR10, "meta", meta)
    return tmp_path


@pytest.fixture
def fake_stl10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    # STL-10 binaries hold each channel column-major: write the transpose of each plane
    stored = pattern(96, 3).transpose(0, 2, 1)
    for name, n in (("train_X.bin", 3), ("test_X.bin", 2), ("unlabeled_X.bin", 4)):
        (folder / name).write_bytes(np.stack([stored] * n).tobytes())
    (folder / "train_y.bin").write_bytes(bytes([1, 5, 10]))  # 1-based
    (folder / "test_y.bin").write_bytes(bytes([2, 3]))
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    files = ["train_X.bin", "train_y.bin", "unlabeled_X.bin"]
    monkeypatch.setattr(STL10, "train_list", [[f, _md5(folder / f)] for f in files])
    monkeypatch.setattr(
        STL10, "test_list", [[f, _md5(folder / f)] for f in ("test_X.bin", "test_y.bin")]
    )
    return tmp_path


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)).save(path)


def _fake_emnist(root: Path) -> None:
    raw = root / "EMNIST" / "raw"
    write_idx(raw / "emnist-letters-train-images-idx3-ubyte", np.stack([pattern(28)[0].T] * 40))
    write_idx(raw / "emnist-letters-train-labels-idx1-ubyte", np.arange(40) % 26 + 1)


def _fake_ffhq(root: Path) -> None:
    for k in range(40):
        write_png(root / "ffhq" / "00000" / f"{k:05d}.png", pattern(64, 3))
