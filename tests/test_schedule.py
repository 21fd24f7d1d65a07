import math

import pytest
import torch

from ddpm.schedule import NoiseSchedule


def test_linear_schedule_matches_ho_et_al():
    s = NoiseSchedule.linear(1000, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    # ᾱ_T of the DDPM schedule, a known figure (Ho et al. choose it so that ᾱ_T ≈ 4e-5)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    assert torch.allclose(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-6)
    assert s.alphas_cumprod.dtype == torch.float32


def test_posterior_variance_closed_form():
    s = NoiseSchedule.linear(1000)
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    a_bar = torch.cumprod(1 - b, 0)
    # t = 0 (the paper's t = 1): ᾱ_{t-1} = 1, so β̃ = 0 and its log is clipped to the next value
    assert s.posterior_variance[0].item() == 0.0
    expected_1 = b[1] * (1 - a_bar[0]) / (1 - a_bar[1])
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(expected_1), rel=1e-6
    )
    expected_last = b[-1] * (1 - a_bar[-2]) / (1 - a_bar[-1])
    assert s.posterior_variance[-1].item() == pytest.approx(expected_last.item(), rel=1e-6)


def test_posterior_mean_is_eq7():
    s = NoiseSchedule.linear(100, 1e-3, 0.05)
    x0, xt = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 40, 99])
    mean, var, _ = s.posterior(x0, xt, t)
    b = torch.linspace(1e-3, 0.05, 100, dtype=torch.float64)
    a = 1 - b
    ab = torch.cumprod(a, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    for i, ti in enumerate(t.tolist()):
        want = (ab_prev[ti].sqrt() * b[ti] / (1 - ab[ti])) * x0[i].double() + (
            a[ti].sqrt() * (1 - ab_prev[ti]) / (1 - ab[ti])
        ) * xt[i].double()
        assert torch.allclose(mean[i].double(), want, atol=1e-5)
        assert var[i].item() == pytest.approx(
            (b[ti] * (1 - ab_prev[ti]) / (1 - ab[ti])).item(), rel=1e-5
        )


def test_cosine_schedule_at_half():
    s = NoiseSchedule.cosine(1000, s=0.008)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # index 499 is the paper's t = 500
    assert s.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-5)
    # β is clipped at 0.999 (in float64; stored as float32)
    assert s.betas[-1].item() == pytest.approx(0.999, rel=1e-7)
    assert s.betas.max().item() == s.betas[-1].item()


def test_sigmoid_schedule_is_valid_and_decreasing():
    s = NoiseSchedule.sigmoid(1000)
    assert torch.all(s.betas > 0) and torch.all(s.betas <= 0.999)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])
    assert s.alphas_cumprod[-1] < 1e-3 < s.alphas_cumprod[0]


def test_q_sample_statistics():
    s = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.5)
    t = torch.full((200_000,), 300)
    xt = s.q_sample(x0, t, torch.randn(200_000, generator=g))
    a = s.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.5, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - a, rel=1e-2)


def test_conversions_invert_each_other():
    s = NoiseSchedule.cosine(1000)
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 998])
    xt = s.q_sample(x0, t, eps)
    assert torch.allclose(s.predict_x0(xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(s.predict_eps(xt[1:], t[1:], x0[1:]), eps[1:], atol=1e-3)
    v = s.velocity(x0, t, eps)
    assert torch.allclose(s.eps_from_v(xt, t, v), eps, atol=1e-4)


def test_snr_is_alpha_bar_ratio():
    s = NoiseSchedule.linear(1000)
    t = torch.tensor([0, 999])
    a = s.alphas_cumprod[t]
    assert torch.allclose(s.snr(t), a / (1 - a))
    assert s.snr(t)[0] > s.snr(t)[1]


@pytest.mark.parametrize(
    "build",
    [
        lambda: NoiseSchedule.linear(1000, 0.0, 0.02),
        lambda: NoiseSchedule.linear(1000, 0.03, 0.02),
        lambda: NoiseSchedule.linear(1000, 1e-4, 1.5),
        lambda: NoiseSchedule.linear(0),
        lambda: NoiseSchedule([0.1, -0.2]),
    ],
)
def test_bad_betas_are_refused(build):
    with pytest.raises(ValueError, match="beta|timesteps"):
        build()


def test_respace_is_the_chain_on_a_subsequence():
    """Respaced: ᾱ equal the training ones at ts, β_i = 1 - ᾱ_ts[i] / ᾱ_ts[i-1], and the eq. 7
    tables follow (float64); over every t it is the schedule itself."""
    schedule = NoiseSchedule.cosine(1000)
    ts = torch.tensor([0, 10, 400, 999])
    chain = schedule.respace(ts)
    a_bar = schedule.alphas_cumprod.double()[ts]
    assert chain.alphas_cumprod.dtype == torch.float64 and chain.num_timesteps == 4
    # the samplers' former coefficients, written out: the respaced tables equal them exactly
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a_bar[:-1]])
    betas = 1 - a_bar / a_prev
    former = {
        "alphas_cumprod": a_bar,
        "alphas_cumprod_prev": a_prev,
        "betas": betas,
        "posterior_variance": betas * (1 - a_prev) / (1 - a_bar),
        "posterior_mean_coef1": a_prev.sqrt() * betas / (1 - a_bar),
        "posterior_mean_coef2": (1 - betas).sqrt() * (1 - a_prev) / (1 - a_bar),
        "sqrt_recip_alphas_cumprod": (1 / a_bar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / a_bar - 1).sqrt(),
    }
    for name, value in former.items():
        assert torch.equal(getattr(chain, name), value), name
    # every t: the training chain (its β re-derived from the stored float32 ᾱ)
    whole = schedule.respace(torch.arange(1000))
    for name in ("alphas_cumprod", "alphas_cumprod_prev"):
        torch.testing.assert_close(getattr(whole, name).float(), getattr(schedule, name))
