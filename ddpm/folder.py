"""Reading a folder or a zip of images (FFHQ, any image collection) into one uint8 tensor.

torchvision's ImageFolder decodes per item at every epoch and knows no zips; diffusion training
wants every image decoded and resized once, so this reads them all up front, in threads (PIL
releases the GIL while it decodes and resizes).
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def _listing(root: Path) -> tuple[list[str], Callable[[str], bytes], str]:
    """Relative POSIX paths of the images under a folder or inside a zip, and a reader."""
    if root.is_dir():
        names = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        return names, lambda name: (root / name).read_bytes(), "folder"
    if root.is_file() and root.suffix.lower() == ".zip":
        try:
            archive = zipfile.ZipFile(root)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{root} is not a readable zip file ({e})") from e
        names = sorted(
            n
            for n in archive.namelist()
            if PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES and not n.startswith("__MACOSX/")
        )
        return names, archive.read, "zip"
    raise FileNotFoundError(
        f"no image folder or .zip at {root}; set dataset.data_dir to a folder of images "
        "(optionally one subfolder per class) or to a zip of them"
    )


def convert(img: Image.Image, mode: str) -> Image.Image:
    """An opened image as 8-bit `mode` ("L" or "RGB"): PIL's convert (palette images become
    their colours, alpha is dropped), 16-bit grayscale by its top 8 bits (PIL's own convert
    clips it at 255). Training folders and eval.py's image sources both read through this."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).astype(np.uint8))
    return img.convert(mode)


def _decode(data: bytes, size: int, mode: str) -> np.ndarray:
    """Decode, convert to L or RGB, resize the shorter side to `size`, centre-crop: (H, W[, 3])."""
    with Image.open(io.BytesIO(data)) as img:
        img = convert(img, mode)
        w, h = img.size
        scale = size / min(w, h)
        if scale != 1:
            img = img.resize(
                (max(size, round(w * scale)), max(size, round(h * scale))),
                Image.Resampling.BICUBIC,
                reducing_gap=3.0,
            )
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)))


def load_image(path: str | Path, size: int, channels: int) -> Tensor:
    """One image file as a (1, C, size, size) uint8 tensor, decoded like a training folder's
    (shorter side resized to `size`, centre-cropped); an unreadable file is named."""
    try:
        data = Path(path).read_bytes()
        array = _decode(data, size, "L" if channels == 1 else "RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the image {path}: {err}; give a PNG or JPEG file") from None
    tensor = torch.from_numpy(array.copy())
    return (tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1))[None]


def load_image_folder(
    root: str | Path, size: int, channels: int, class_folders: bool = True, skip_bad: bool = False
) -> tuple[Tensor, Tensor | None, list[str]]:
    """All images under `root` (a folder or .zip) as uint8 (N, channels, size, size).

    With `class_folders`, images in top-level subfolders get the subfolder's index among the
    sorted subfolder names as label; images at the top level make the dataset unlabelled.
    Unreadable images raise an error naming them, or with `skip_bad` are skipped with a warning.
    """
    root = Path(root)
    names, read, kind = _listing(root)
    if not names:
        raise ValueError(
            f"the {kind} {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "check dataset.data_dir"
        )
    mode = "L" if channels == 1 else "RGB"

    def decode(name: str) -> np.ndarray | Exception:
        try:
            return _decode(read(name), size, mode)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, zipfile.BadZipFile) as e:
            return e

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(decode, names, chunksize=64))
    bad = [(n, d) for n, d in zip(names, decoded, strict=True) if isinstance(d, Exception)]
    if bad and not skip_bad:
        name, err = bad[0]
        raise ValueError(
            f"cannot read image {root / name} ({type(err).__name__}: {err}); "
            f"{len(bad)} of {len(names)} images are unreadable. Fix or remove them, or set "
            "dataset.skip_bad=true to train on the readable ones"
        )
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable images of {len(names)} in {root} "
            f"(first: {bad[0][0]}: {bad[0][1]})",
            stacklevel=2,
        )
    good = [(n, d) for n, d in zip(names, decoded, strict=True) if not isinstance(d, Exception)]
    if not good:
        raise ValueError(f"none of the {len(names)} images in {root} could be read")
    array = np.stack([d for _, d in good])
    images = torch.from_numpy(array[:, None] if channels == 1 else array.transpose(0, 3, 1, 2))

    classes = sorted(
        {PurePosixPath(n).parts[0] for n, _ in good if len(PurePosixPath(n).parts) > 1}
    )
    if not class_folders or not classes or any(len(PurePosixPath(n).parts) == 1 for n, _ in good):
        return images.contiguous(), None, []
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[PurePosixPath(n).parts[0]] for n, _ in good], dtype=torch.long)
    return images.contiguous(), labels, classes
