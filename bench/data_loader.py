"""Throughput of the data path alone: decode once, then batches per second and peak memory.

    python -m bench.data_loader                 # every dataset, one process each
    python -m bench.data_loader --only cifar10

No dataset can be downloaded here, so each is written first as random images in its real
on-disk format and at its real size (idx files, pickled batches, STL-10 binaries, a PNG folder),
then read by the real loading code. The timed part is what a training step waits for: the
DataLoader's batch plus the module-side scaling to [-1, 1] and random flips (on the CPU here).
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# name: (count, size, channels, batch, flips)
CASES = {
    "mnist": (60_000, 28, 1, 128, False),
    "emnist": (124_800, 28, 1, 128, False),
    "cifar10": (50_000, 32, 3, 128, True),
    "stl10": (20_000, 96, 3, 64, True),  # the unlabeled split, 20k of its 100k images
    "ffhq": (2_000, 128, 3, 64, True),  # PNGs at 128 px, the thumbnails' size
}


def _idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def write_fake(name: str, root: Path, n: int, size: int, channels: int) -> dict:
    """Random images in the dataset's real format under root; returns ImageDataModule options."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    if name == "mnist":
        for part in ("train", "t10k"):
            _idx(root / "MNIST/raw" / f"{part}-images-idx3-ubyte", images[:, 0])
            _idx(root / "MNIST/raw" / f"{part}-labels-idx1-ubyte", labels)
        return {}
    if name == "emnist":
        _idx(root / "EMNIST/raw/emnist-letters-train-images-idx3-ubyte", images[:, 0])
        _idx(root / "EMNIST/raw/emnist-letters-train-labels-idx1-ubyte", labels + 1)
        return {"subset": "letters", "num_classes": 26}
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        parts = np.array_split(np.arange(n), 5)
        for i, idx in enumerate(parts, 1):
            batch = {"data": images[idx].reshape(len(idx), -1), "labels": labels[idx].tolist()}
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        (folder / "test_batch").write_bytes(
            pickle.dumps({"data": images[:10].reshape(10, -1), "labels": [0] * 10})
        )
        (folder / "batches.meta").write_bytes(
            pickle.dumps({"label_names": [str(i) for i in range(10)]})
        )
        return {}
    if name == "stl10":
        folder = root / "stl10_binary"
        folder.mkdir(parents=True)
        (folder / "unlabeled_X.bin").write_bytes(images.tobytes())
        for f in ("train_X.bin", "test_X.bin"):
            (folder / f).write_bytes(images[:10].tobytes())
        for f in ("train_y.bin", "test_y.bin"):
            (folder / f).write_bytes(bytes([1] * 10))
        return {"split": "unlabeled", "num_classes": None}
    if name == "ffhq":
        from PIL import Image

        for i in range(n):
            folder = root / "ffhq" / f"{i // 1000 * 1000:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].transpose(1, 2, 0)).save(
                folder / f"{i:05d}.png", compress_level=1
            )
        return {"data_dir": str(root / "ffhq"), "num_classes": None}
    raise ValueError(name)


def _trust_fakes(name: str, root: Path) -> None:
    """Benchmarks only: point torchvision's published md5 lists at the fake files."""
    import hashlib

    from torchvision.datasets import CIFAR10, STL10

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    if name == "cifar10":
        folder = root / CIFAR10.base_folder
        CIFAR10.train_list = [
            [f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)
        ]
        CIFAR10.test_list = [["test_batch", md5(folder / "test_batch")]]
        CIFAR10.meta = {**CIFAR10.meta, "md5": md5(folder / "batches.meta")}
    else:
        folder = root / STL10.base_folder
        STL10.train_list = [
            [f, md5(folder / f)] for f in ("train_X.bin", "train_y.bin", "unlabeled_X.bin")
        ]
        STL10.test_list = [[f, md5(folder / f)] for f in ("test_X.bin", "test_y.bin")]


def measure(name: str, batches: int = 300) -> dict:
    """Run in a fresh process: write the fake copy, load it, time the batches."""
    import torch

    from ddpm.data.datamodule import ImageDataModule

    n, size, channels, batch, flips = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        options = {
            "data_dir": str(root),
            "num_classes": 10,
            **write_fake(name, root, n, size, channels),
        }
        if name in ("cifar10", "stl10"):
            _trust_fakes(name, root)
        dm = ImageDataModule(
            name=name,
            image_size=size,
            channels=channels,
            batch_size=batch,
            hflip=flips,
            val_fraction=0.0,
            **options,
        )
        start = time.perf_counter()
        dm.setup("fit")
        decode_s = time.perf_counter() - start

        class _Training:  # flips happen only while training
            training = True

        dm.trainer = _Training()
        loader = dm.train_dataloader()
        seen, start = 0, None
        while seen < batches * batch:
            for i, b in enumerate(loader):
                if start is None and i == 10:  # after warm-up
                    start, seen = time.perf_counter(), 0
                x, _ = dm.on_after_batch_transfer(b, 0)
                seen += x.shape[0]
                if start is not None and seen >= batches * batch:
                    break
        elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "dataset": name,
        "images": n,
        "size": f"{channels}x{size}x{size}",
        "batch": batch,
        "decode_s": round(decode_s, 2),
        "images_per_s": round(seen / elapsed),
        "peak_rss_mb": round(peak_mb),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(CASES), help="one dataset, in this process")
    parser.add_argument("--json", default="bench/results/data_loader.json")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only)))
        return
    rows = []
    for name in CASES:
        out = subprocess.run(
            [sys.executable, "-m", "bench.data_loader", "--only", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['dataset']:8} {r['images']:>7} x {r['size']:10} batch {r['batch']:>3}  "
            f"decode {r['decode_s']:6.2f} s  loader {r['images_per_s']:>9,} img/s  "
            f"peak {r['peak_rss_mb']:>6,} MB",
            flush=True,
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
