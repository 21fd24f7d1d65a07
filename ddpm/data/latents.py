"""The data of a latent DDPM: a dataset's images encoded once by an autoencoder and cached.

`LatentDataModule` is an `ImageDataModule` whose batches are latents: the posterior means of
the autoencoder's encoder, times LDM's scale factor 1 / std (Rombach et al. 2022, Sec. 4.3.2,
computed over the training latents), so the diffusion model sees unit-variance data. The cache
(`<cache_dir>/latents/*.pt`) is keyed by the autoencoder checkpoint's bytes, the dataset, its
options, size and split: a change of any of them encodes anew; a cache file that does not load
or does not fit its key (or holds latents of the wrong shape, NaN, or bytes that do not match
their checksum) is named, moved aside and rebuilt. cache_dir null: the per-user cache
(`ddpm.files.user_cache_dir`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddpm.autoencoder import autoencoder_file_problem, downsampling, load_autoencoder
from ddpm.data.datamodule import ImageDataModule, TensorImages
from ddpm.files import (
    atomic_write,
    cache_root,
    file_sha256,
    load_failure,
    move_aside,
    remove_dead_temps,
)

log = logging.getLogger(__name__)


def latents_digest(cached: dict) -> str:
    """sha256 of a cache's latents and labels: a flipped bit or a planted tensor is caught."""
    digest = hashlib.sha256()
    for name in ("train", "val", "train_labels", "val_labels"):
        value = cached.get(name)
        digest.update(name.encode())
        if isinstance(value, Tensor):
            digest.update(str((value.dtype, tuple(value.shape))).encode())
            digest.update(value.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_problem(cached: object, key: dict) -> str | None:
    """Why a loaded latent cache cannot be used for `key` (its count, shapes, finiteness,
    scale and checksum), or None. Caches of earlier versions, without a checksum, are checked
    for all but that."""
    if not isinstance(cached, dict) or cached.get("key") != key:
        return "it was made for another key"
    latents = [cached.get("train"), cached.get("val")]
    if not all(isinstance(x, Tensor) and x.is_floating_point() and x.ndim == 4 for x in latents):
        return "its train / val latents are not (N, c, h, w) float tensors"
    train, val = latents
    if train.shape[1:] != val.shape[1:] or len(train) == 0:
        return f"its latents are {tuple(train.shape)} and {tuple(val.shape)}, not one shape"
    for name, x in (("train", train), ("val", val)):
        labels = cached.get(f"{name}_labels")
        if labels is not None and (not isinstance(labels, Tensor) or len(labels) != len(x)):
            return f"its {name} labels do not count its {len(x)} {name} latents"
        if not bool(x.isfinite().all()):
            return f"its {name} latents hold NaN or inf"
    scale = cached.get("scale")
    if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
        return f"its scale {scale!r} is not a positive number"
    if not isinstance(cached.get("class_names"), list):
        return "its class names are not a list"
    if "sha256" in cached and cached["sha256"] != latents_digest(cached):
        return "its latents do not match their checksum"
    return None


@torch.no_grad()
def encode(net: torch.nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """uint8 images (N, C, H, W) -> the encoder's posterior means (N, c, H/f, W/f), float32."""
    out = []
    for chunk in images.split(batch_size):
        x = chunk.float() / 127.5 - 1
        out.append(net.encode(x).latent_dist.mean.float())
    return torch.cat(out) if out else torch.empty(0)


class LatentDataModule(ImageDataModule):
    """`ImageDataModule` (all its dataset options) + `autoencoder`: the checkpoint whose
    latents the diffusion model learns. Random flips are off: a flipped latent is not the
    latent of a flipped image."""

    def __init__(
        self, *args: Any, autoencoder: str | None = None, cache_dir: str | None = None, **kwargs
    ) -> None:
        if not autoencoder:
            raise ValueError(
                "a latent DDPM needs autoencoder=PATH/TO/last.ckpt (train one with "
                "python train.py experiment=autoencoder_mnist5k)"
            )
        problem = autoencoder_file_problem(autoencoder)
        if problem:
            raise FileNotFoundError(problem)
        kwargs["hflip"] = False
        super().__init__(*args, **kwargs)
        self.autoencoder, self.cache_dir = str(autoencoder), cache_root(cache_dir)
        self.latent_scale: float | None = None

    def key(self) -> dict[str, Any]:
        return {
            "autoencoder": file_sha256(self.autoencoder),
            "dataset": self.name,
            "options": sorted(self.options.items()),
            "data_dir": str(self.data_dir),
            "image_size": self.image_size,
            "channels": self.channels,
            "val_fraction": self.val_fraction,
            "val_split": self.val_split,
            "split_seed": self.split_seed,
        }

    def setup(self, stage: str | None = None) -> None:
        if self.latent_scale is not None:
            return
        key = self.key()
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        path = self.cache_dir / "latents" / f"{self.name}-{self.image_size}-{name}.pt"
        remove_dead_temps(path.parent)
        cached = self._load(path, key)
        if cached is None:
            cached = self._encode(key)
            cached["sha256"] = latents_digest(cached)
            try:
                atomic_write(path, lambda f: torch.save(cached, f))
                log.info("latents of %s cached in %s", self.name, path)
            except OSError as e:  # a full disk, a read-only cache: the latents are in memory
                log.warning("latents not cached (%s); encoded again next time", e)
        self.class_names = list(cached["class_names"])
        self.latent_scale = float(cached["scale"])
        scale = self.latent_scale
        self.train_set = TensorImages(cached["train"] * scale, cached["train_labels"])
        self.val_set = TensorImages(cached["val"] * scale, cached["val_labels"])

    def _load(self, path: Path, key: dict) -> dict | None:
        if not path.is_file():
            return None
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            problem = cache_problem(cached, key)
        except Exception as e:  # truncated, empty, not a torch file, a pickle with code ...
            problem = load_failure(e)
        if problem is None:
            return cached
        aside = move_aside(path)
        log.warning("latent cache %s: %s; moved to %s and encoded anew", path, problem, aside)
        return None

    def _encode(self, key: dict) -> dict:
        net, info = load_autoencoder(self.autoencoder)
        trained = info.get("image_size")
        if trained is not None and trained != self.image_size:
            raise ValueError(
                f"autoencoder={self.autoencoder} was trained on {trained} px images, the "
                f"dataset is at {self.image_size} px; set dataset.image_size={trained}"
            )
        if net.config.in_channels != self.channels:
            raise ValueError(
                f"autoencoder={self.autoencoder} takes {net.config.in_channels}-channel images, "
                f"the dataset gives {self.channels}; set dataset.channels"
            )
        super().setup()  # the uint8 images, split as a pixel DDPM splits them
        log.info(
            "encoding %d + %d images of %s with %s (f = %d)",
            len(self.train_set),
            len(self.val_set),
            self.name,
            self.autoencoder,
            downsampling(net),
        )
        train, val = encode(net, self.train_set.images), encode(net, self.val_set.images)
        std = train.std().item()
        if not std > 0:
            raise ValueError(f"autoencoder={self.autoencoder} maps every image to one latent")
        return {
            "key": key,
            "train": train,
            "val": val,
            "train_labels": self.train_set.labels,
            "val_labels": self.val_set.labels,
            "class_names": list(self.class_names),
            "scale": 1.0 / std,  # LDM's scale factor: unit-variance latents
        }

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int):
        return batch  # latents are already what the model learns (no uint8 scaling, no flips)
