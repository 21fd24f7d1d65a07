"""What eval.py measures, read as batches of uint8 images: a folder of images (sample.py's
`images/` or any), an .npz of uint8 arrays (the evaluators' format, its declared size checked
before it is read), or a dataset's held-out split."""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import numpy.lib.format as npy
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ddpm.cli.sample_folder import IMAGE_NAME, SETTINGS
from ddpm.data.folder import (
    DEFLATE_MAX_RATIO,
    IMAGE_SUFFIXES,
    MAX_IMAGE_BYTES,
    ImageTooLarge,
    convert,
    open_image,
)
from ddpm.files import (
    check_regular,
    read_regular,
)
from ddpm.generate import generate
from ddpm.images import to_uint8
from ddpm.module import DiffusionModule
from ddpm.samplers import (
    sampler_label,
    sampler_settings,
)

log = logging.getLogger(__name__)


def read_image(path: Path, channels: int) -> np.ndarray:
    """An image file as uint8 (H, W) for channels=1 or (H, W, 3), converted as the reference
    images of an image-folder dataset are (`ddpm.folder.convert`). Read with the bounds of a
    training folder's images: a regular file of at most MAX_IMAGE_BYTES, MAX_PIXELS."""
    data = read_regular(path, MAX_IMAGE_BYTES, "source")  # a FIFO swapped in cannot block
    try:
        with open_image(data) as img:
            return np.asarray(convert(img, "L" if channels == 1 else "RGB"))
    except ImageTooLarge as e:
        raise ValueError(f"source: {path}: {e}") from None


def npz_array(path: Path) -> np.ndarray:
    """An .npz's arr_0 as uint8 (N, H, W, C), checked: (N, H, W) grayscale gets C = 1, and
    (N, C, H, W) (PyTorch's layout, C = 1 or 3 and W not) is transposed."""
    check_regular(path, "source")  # np.load would wait forever on a FIFO
    try:
        archive = np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(
            f"source={path} is not a readable .npz ({type(e).__name__}: {e}); write it with "
            "np.savez(path, arr_0=images)"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"source={path} holds one bare array (.npy), not an .npz archive; write it with "
            "np.savez(path, arr_0=images)"
        )
    with archive:
        if "arr_0" not in archive.files:
            raise ValueError(
                f"source={path} has no arr_0 (it holds {', '.join(archive.files) or 'nothing'}); "
                "eval.py reads the images from arr_0, as OpenAI's and EDM's evaluators do: "
                "np.savez(path, arr_0=images)"
            )
        check_declared_size(archive, path)
        try:
            array = archive["arr_0"]
        except ValueError as e:  # an object array, which would need pickle
            raise ValueError(f"source={path}: arr_0 is not a plain array ({e})") from None
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        log.info("%s: arr_0 is (N, C, H, W) %s; read as (N, H, W, C)", path, array.shape)
        array = array.transpose(0, 2, 3, 1)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or array.dtype != np.uint8:
        raise ValueError(
            f"source={path}: arr_0 is {array.dtype} {array.shape}; expected uint8 images "
            "(N, H, W, C) with C = 1 or 3, (N, C, H, W) or (N, H, W)"
        )
    return array


def check_declared_size(archive: np.lib.npyio.NpzFile, path: Path) -> None:
    """Refuse an arr_0 whose header declares more bytes than the archive holds of it, before
    numpy allocates them all (a few bytes declaring terabytes is a MemoryError traceback)."""
    names = archive.zip.namelist()
    info = archive.zip.getinfo("arr_0.npy" if "arr_0.npy" in names else "arr_0")
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    try:
        with archive.zip.open(info) as member:
            read = readers.get(npy.read_magic(member))
            if read is None:  # a later format version: numpy checks it itself
                return
            shape, _, dtype = read(member)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"source={path}: arr_0 is unreadable ({e})") from None
    declared = math.prod(shape) * dtype.itemsize
    holds = info.file_size  # and a deflated member, at most what deflate's best ratio gives
    if info.compress_type == zipfile.ZIP_DEFLATED:
        holds = min(holds, DEFLATE_MAX_RATIO * info.compress_size + 2**10)
    if declared > holds:
        raise ValueError(
            f"source={path}: arr_0 declares {dtype} {shape} ({declared / 2**30:.1f} GiB), but "
            f"the archive holds at most {holds} bytes of it: a truncated or crafted file; "
            "write it again with np.savez(path, arr_0=images)"
        )


def npz_images(path: Path, n: int, channels: int = 3) -> torch.Tensor:
    """The first n images of an .npz's arr_0 as (n, C, H, W) uint8: (N, H, W, C) as OpenAI's and
    EDM's evaluators store them, (N, C, H, W), or (N, H, W) grayscale (`npz_array`). RGB images
    compared with a grayscale reference are converted as image files are (PIL's "L");
    grayscale ones are repeated to RGB by the metrics, which is PIL's "RGB" of them."""
    array = npz_array(path)
    if len(array) < n:
        raise ValueError(f"source={path} holds {len(array)} images, fewer than n={n}; lower n")
    array = array[:n]
    if channels == 1 and array.shape[-1] == 3:
        array = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in array])[..., None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def source_folder(source: Path) -> Path:
    """The folder of images to measure: sample.py's output folder means its images/ (one PNG
    per image), not its grid.png, text.png or noise-level figure."""
    if (source / SETTINGS).is_file() or (
        (source / "grid.png").is_file() and (source / "images").is_dir()
    ):
        log.info(
            "source=%s is a sample.py output folder: measuring its images/, not grid.png", source
        )
        return source / "images"
    return source


def image_files(source: Path, n: int) -> list[Path]:
    """The first n image files of a folder (sorted, subfolders included), all of one size."""
    folder = source_folder(source)
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if folder != source:
        found = [p for p in found if IMAGE_NAME.fullmatch(p.name)]
    if len(found) < n:
        raise ValueError(
            f"source={folder} holds {len(found)} image files "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}), fewer than n={n}; lower n or add images"
        )
    files = found[:n]
    sizes: dict[tuple[int, int], Path] = {}
    for path in files:  # PIL reads the size from the header, not the pixels
        check_regular(path, "source")  # a FIFO would block PIL's open
        try:
            with open_image(path) as img:
                sizes.setdefault(img.size, path)
        except ImageTooLarge as e:
            raise ValueError(f"source: {path}: {e}") from None
        except (OSError, SyntaxError) as e:
            raise ValueError(f"source: cannot read {path} ({e}); remove or replace it") from None
    if len(sizes) > 1:
        (a, first), (b, other) = list(sizes.items())[:2]
        raise ValueError(
            f"source={folder} holds images of different sizes ({first.name} is {a[0]}x{a[1]}, "
            f"{other.name} {b[0]}x{b[1]}): FID compares images of one size; resize them all "
            "to the reference's size, or give a folder of one size"
        )
    lossy = [p for p in files if p.suffix.lower() in (".jpg", ".jpeg")]
    if lossy:
        log.warning(
            "source: %d of %d images are JPEGs, whose compression artefacts raise FID; "
            "papers measure lossless images (PNG or an .npz)",
            len(lossy),
            len(files),
        )
    return files


def checkpoint_sampler(cfg: DictConfig, name: str | None = None, steps: int | None = None):
    """The sampler setting a checkpoint source is drawn with: cfg.sampler and steps=, or
    `name` and `steps` over them (the options of cfg.sampler apply when it is the same sampler;
    another one runs with its defaults)."""
    sampler = sampler_settings(OmegaConf.to_container(cfg.sampler, resolve=True), cfg.steps)
    if name is not None and name != sampler["sampler"]:
        sampler = {"sampler": name, "steps": None}  # another sampler: its own defaults
    if steps is not None:
        sampler["steps"] = steps
    return sampler


def source_batches(
    cfg: DictConfig,
    module: DiffusionModule | None,
    channels: int,
    name: str | None = None,
    steps: int | None = None,
    **generating: Any,
) -> tuple[Iterator[torch.Tensor], str | None]:
    """uint8 (B, C, H, W) batches of the first n images of the source, and the sampler's label.

    Image files are read with the reference's `channels`. A checkpoint source is sampled with
    `module`, the one eval.py loaded from it; `name` and `steps` override the sampler config
    (the options of cfg.sampler apply when it is the same sampler; another one runs with its
    defaults); `generating` goes to `generate` (compile=, evaluations=).
    """
    source = Path(cfg.source)
    if source.suffix == ".npz":
        return iter(npz_images(source, cfg.n, channels).split(cfg.batch_size)), None
    if source.is_dir():
        files = image_files(source, cfg.n)

        def read() -> Iterator[torch.Tensor]:
            for i in range(0, len(files), cfg.batch_size):
                arrays = [read_image(f, channels) for f in files[i : i + cfg.batch_size]]
                batch = torch.from_numpy(np.stack(arrays))
                yield batch[:, None] if batch.ndim == 3 else batch.permute(0, 3, 1, 2)

        return read(), None
    if source.suffix == ".ckpt":
        sampler = checkpoint_sampler(cfg, name, steps)
        batches = generate(
            module,
            cfg.n,
            sampler=sampler,
            seed=cfg.seed,
            guidance=cfg.guidance if module.num_classes else 0.0,
            batch_size=cfg.batch_size,
            progress=False,  # the metrics' bar counts these images
            **generating,
        )
        label = sampler_label(sampler, module.schedule.num_timesteps)
        return (to_uint8(images) for _, images in batches), label
    raise FileNotFoundError(f"source={source}: not an .npz, a folder of images or a .ckpt")


def held_out_images(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The first n images (uint8) and labels of `nll_split`: "val" is the part of the dataset
    training held out (the datamodule's validation split), anything else a split of the
    source (e.g. CIFAR-10's test set, as DDPM's Table 2 reports)."""
    datamodule = hydra.utils.instantiate(cfg.dataset)
    if cfg.nll_split == "val":
        datamodule.setup("fit")
        images, labels = datamodule.val_set.images, datamodule.val_set.labels
    else:
        data = datamodule.load(cfg.nll_split)
        images, labels = data.images, data.labels
    if len(images) < cfg.n:
        raise ValueError(
            f"nll_split={cfg.nll_split} of {datamodule.name} holds {len(images)} images, fewer "
            f"than n={cfg.n}; lower n"
        )
    label = f"{datamodule.name}_{cfg.nll_split}"
    return images[: cfg.n], None if labels is None else labels[: cfg.n], label
