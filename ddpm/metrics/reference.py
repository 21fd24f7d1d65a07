"""Reference statistics: which real images FID and KID are measured against, the key that
names them by content (the images' pixels and the network's weights), and their cache on disk,
which a change of either recomputes and a corrupt file does not break."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from ddpm.files import atomic_write, cache_root, load_failure, move_aside, remove_dead_temps
from ddpm.metrics.fid import REAL_STATES, InceptionMetrics
from ddpm.metrics.inception import weights_digest

log = logging.getLogger(__name__)


def reference_subset(images: Tensor, n: int | None) -> Tensor:
    """n images of a split for the reference, drawn with a fixed seed (not the first n: some
    datasets are sorted by class, and their first n would all be one class)."""
    if n is None or n >= len(images):
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[:n].sort().values]


def images_digest(images: Tensor) -> str:
    """sha256 of a uint8 image tensor's shape and pixels: the reference images by content."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().cpu().numpy())  # the buffer itself, not a copy
    return digest.hexdigest()


def stats_key(
    dataset: str,
    split: str,
    images: Tensor,
    weights: str | None,
    features: int,
    cache_dir: str | Path | None = None,
) -> dict:
    """What reference statistics depend on: the reference images (N, C, H, W) uint8 and the
    network's weights by content, and the feature layer; a change in any of it means computing
    them anew. Dataset and split are there to be read (they name the metric)."""
    return {
        "dataset": dataset,
        "split": split,
        "n": len(images),
        "size": int(images.shape[-1]),
        "channels": int(images.shape[1]),
        "images_sha256": images_digest(images),
        "network_sha256": weights_digest(weights, cache_dir),
        "features": features,
    }


def state_digest(state: dict) -> str:
    """sha256 of a statistics file's tensors (by name, dtype, shape and bytes): a bit flipped
    on disk, or one tensor swapped for another of its shape, is caught."""
    digest = hashlib.sha256()
    for name in sorted(k for k, v in state.items() if isinstance(v, Tensor)):
        value = state[name].contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy() if value.ndim else value.numpy().tobytes())
    return digest.hexdigest()


def _cache_problem(cached: object, key: dict, features: int) -> str | None:
    """Why a loaded statistics file cannot be used for `key`, or None."""
    if not isinstance(cached, dict) or not all(s in cached for s in REAL_STATES):
        return "it is not a reference-statistics file"
    if cached.get("key") != key:
        return "it holds the statistics of another reference or network"
    shapes = {
        "real_features_sum": (features,),
        "real_features_cov_sum": (features, features),
        "kid_real_features": (key["n"], features),
    }
    for name, shape in shapes.items():
        value = cached.get(name)
        if name in cached and (not isinstance(value, Tensor) or tuple(value.shape) != shape):
            return f"its {name} is not a {shape} tensor"
        if name in cached and not bool(value.isfinite().all()):
            return f"its {name} is not finite"
    if int(cached["real_features_num_samples"]) != key["n"]:
        return f"it counts {int(cached['real_features_num_samples'])} images, not {key['n']}"
    if "sha256" in cached and cached["sha256"] != state_digest(cached):  # older files: none
        return "its tensors do not match their checksum"
    return None


def cached_reference(
    metrics: InceptionMetrics,
    key: dict,
    real_images: Callable[[], Iterable[Tensor]],
    cache_dir: str | Path | None = None,
) -> Path:
    """Fill the metrics' real-image statistics from the cache, or compute them from
    `real_images()` (an iterable of uint8 batches, called only on a miss) and cache them.
    Returns the cache file. A file without KID's features is a miss when KID is on; an
    unreadable or inconsistent one is named in a warning, moved aside and rebuilt."""
    readable = f"{key['dataset']}-{key['split']}-{key['n']}-{key['features']}".replace("/", "_")
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / "fid_stats" / f"{readable}-{digest}.pt"
    remove_dead_temps(path.parent)
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            problem = _cache_problem(cached, key, metrics.features)
        except Exception as e:  # truncated, empty, random bytes, a pickle with code ...
            problem = load_failure(e)  # never torch's advice to load it unsafely
        if problem is None and metrics.load_real_state(cached):
            return path
        if problem is not None:
            aside = move_aside(path)
            log.warning(
                "reference statistics %s: %s; moved to %s and computed anew", path, problem, aside
            )
    for batch in real_images():
        metrics.update(batch, real=True)
    if metrics.real_count != key["n"]:
        raise ValueError(f"expected {key['n']} reference images, got {metrics.real_count}")
    state = {"key": key, **metrics.real_state()}
    state["sha256"] = state_digest(state)
    try:
        atomic_write(path, lambda f: torch.save(state, f))  # two jobs may build one key at once
    except OSError as e:  # a full disk, a read-only cache: the statistics are in memory
        log.warning("reference statistics not cached (%s); computed again next time", e)
    return path


def prepare_reference(
    metrics: InceptionMetrics,
    key: dict,
    real_images: Callable[[], Iterable[Tensor]],
    cache_dir: str | Path,
    rank: int,
) -> None:
    """Reference statistics on rank 0 only: torchmetrics sums (FID) or concatenates (KID)
    every rank's states when it computes, so other ranks must hold none. Rank 0 fills (or
    writes) the cache first."""
    if rank == 0:
        cached_reference(metrics, key, real_images, cache_dir)
    else:
        metrics.clear_real_state()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
