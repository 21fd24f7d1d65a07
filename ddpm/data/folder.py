"""Reading a folder or a zip of images (FFHQ, any image collection) into one uint8 tensor.

torchvision's ImageFolder decodes per item at every epoch and knows no zips; diffusion training
wants every image decoded and resized once, so this reads them all up front, in threads (PIL
releases the GIL while it decodes and resizes).
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ddpm.files import read_regular

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
# The most pixels an image file may declare in its header (checked before anything is decoded):
# 2**27 = 134 M (11585 x 11585) admits every real dataset image, FFHQ's 1024 x 1024 (1 M),
# ImageNet's photos (a few M, the largest tens of M) and even a 100-megapixel camera's
# 11648 x 8736, while a PNG of a few kilobytes that declares 30000 x 30000 (900 M pixels,
# 2.7 GB as RGB, a decompression bomb) is refused. It lies between Pillow's own warning
# (89 M) and refusal (179 M) bounds, so it holds whatever a user sets Image.MAX_IMAGE_PIXELS to.
MAX_PIXELS = 2**27
# The most bytes one image file (or zip member) may hold: MAX_PIXELS of 16-bit RGBA,
# uncompressed. A bigger file (or /dev/zero) is refused before it is read into memory.
MAX_IMAGE_BYTES = 2**30
# Deflate cannot compress better than 1032:1: a zip member declaring more is lying about its
# size (zipfile would inflate up to the declared size).
DEFLATE_MAX_RATIO = 1032


class ImageTooLarge(ValueError):
    """An image file whose header declares more than MAX_PIXELS pixels."""


def _too_large(pixels: str) -> ImageTooLarge:
    return ImageTooLarge(
        f"its header declares {pixels} pixels, more than the {MAX_PIXELS / 1e6:.0f} M an image "
        "may have (ddpm.data.folder.MAX_PIXELS): a decompression bomb, or far larger than any "
        "training image; remove it or downscale it"
    )


@contextmanager
def open_image(source: bytes | Path) -> Iterator[Image.Image]:
    """PIL's lazy open of an image file (its bytes, or a path checked to be a regular file:
    only the header is read), refused with ImageTooLarge when the header declares more than
    MAX_PIXELS, before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise _too_large(f"{w}x{h} ({w * h / 1e6:.0f} M)")
            yield img
    except Image.DecompressionBombError as e:  # Pillow's own bound, also met while decoding
        count = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(f"{int(count[1]) / 1e6:.0f} M" if count else "too many") from None


def _listing(root: Path) -> tuple[list[str], Callable[[str], bytes], str]:
    """Relative POSIX paths of the images under a folder or inside a zip, and a reader."""
    if root.is_dir():
        names = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        return names, lambda name: read_regular(root / name, MAX_IMAGE_BYTES), "folder"
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
        return names, lambda name: _read_member(archive, name), "zip"
    raise FileNotFoundError(
        f"no image folder or .zip at {root}; set dataset.data_dir to a folder of images "
        "(optionally one subfolder per class) or to a zip of them"
    )


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes:
    """A zip member's bytes, refused before inflating when its declared size is absurd: more
    than an image file may hold, or more than its compressed bytes could inflate to."""
    info = archive.getinfo(name)
    if info.file_size > MAX_IMAGE_BYTES:
        raise ValueError(
            f"the zip member declares {info.file_size / 2**20:.0f} MiB uncompressed, more than "
            f"the {MAX_IMAGE_BYTES / 2**20:.0f} MiB an image file may have (a zip bomb?)"
        )
    limit = DEFLATE_MAX_RATIO * info.compress_size + 2**10
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > limit:
        raise ValueError(
            f"the zip member declares {info.file_size} bytes from {info.compress_size} "
            f"compressed, more than deflate's {DEFLATE_MAX_RATIO}:1 can give (a zip bomb?)"
        )
    return archive.read(info)


def convert(img: Image.Image, mode: str) -> Image.Image:
    """An opened image as 8-bit `mode` ("L" or "RGB"): PIL's convert (palette images become
    their colours, alpha is dropped), 16-bit grayscale by its top 8 bits (PIL's own convert
    clips it at 255). Training folders and eval.py's image sources both read through this."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).astype(np.uint8))
    return img.convert(mode)


def _decode(data: bytes, size: int, mode: str) -> np.ndarray:
    """Decode, convert to L or RGB, resize the shorter side to `size`, centre-crop: (H, W[, 3])."""
    with open_image(data) as img:
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


def load_image(path: str | Path, size: int, channels: int, key: str = "image") -> Tensor:
    """One image file as a (1, C, size, size) uint8 tensor, decoded like a training folder's
    (shorter side resized to `size`, centre-cropped). A file that is not a regular one, is
    larger than MAX_IMAGE_BYTES, declares more than MAX_PIXELS or does not decode is named
    (as `key`=path) in one line."""
    unreadable = "cannot read the image {}: {}; give a PNG or JPEG file"
    try:
        data = read_regular(path, MAX_IMAGE_BYTES, key)  # ValueError: a FIFO, a device, too big
    except OSError as err:
        raise ValueError(unreadable.format(path, err)) from None
    try:
        array = _decode(data, size, "L" if channels == 1 else "RGB")
    except ImageTooLarge as err:
        raise ValueError(f"{key}={path}: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(unreadable.format(path, err)) from None
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
        except (
            UnidentifiedImageError,
            OSError,
            ValueError,
            SyntaxError,
            EOFError,
            zipfile.BadZipFile,
        ) as e:
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
        also = f"; also {', '.join(n for n, _ in bad[1:4])}" + (" ..." if len(bad) > 4 else "")
        warnings.warn(
            f"skipped {len(bad)} unreadable images of {len(names)} in {root} "
            f"({bad[0][0]}: {bad[0][1]}{also if len(bad) > 1 else ''})",
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
