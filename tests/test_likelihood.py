"""The variational bound in bits/dim against closed forms: Gaussian data with its exact denoiser,
and improved-diffusion's formulas written out again here (in NumPy, from the papers)."""

import math

import numpy as np
import pytest
import torch

from ddpm.likelihood import (
    bpd_estimate,
    bpd_exact,
    discretized_gaussian_log_likelihood,
    float64,
    importance_timesteps,
    learned_vb_term_bpd,
    normal_kl,
    reverse_log_variance,
    vb_term_bpd,
)
from ddpm.schedule import NoiseSchedule

MU = torch.linspace(-0.5, 0.5, 1024, dtype=torch.float64).reshape(1, 1, 32, 32)
S = 0.1  # 5 s within [-1, 1]: the end bins of the decoder never matter


def exact_model(schedule: NoiseSchedule):
    """ε*(x_t, t) of N(MU, S²) data, with no variance output (fixed variances)."""
    a_bar = schedule.alphas_cumprod.double()

    def denoiser(x, t):
        a = a_bar[t].reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a), None

    return denoiser


def np_cdf(x):  # improved-diffusion's approx_standard_normal_cdf
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * np.power(x, 3))))


def analytic_bpd(schedule: NoiseSchedule, variance: str) -> dict[str, float]:
    """E[bound] / dims / log 2 for N(MU, S²) data and the exact denoiser.

    Given x_t the exact x̂_0 = E[x_0 | x_t] misses x_0 by a N(0, v_t) error,
    v_t = S²σ²/(α²S² + σ²), independent of x_t. So
    E[L_{t-1}] = ½(log σ_p² - log β̃ + β̃/σ_p² - 1 + c1² v_t / σ_p²) with c1 the
    posterior mean's weight of x_0, L_0 = E[-log P_bin(e)] over e ~ N(0, v_0) (Gauss-Hermite), and
    E[L_T] = ½(-log σ_T² + σ_T² + α_T² E[x_0²] - 1)."""
    ab = schedule.alphas_cumprod.double().numpy()
    betas = schedule.betas.double().numpy()
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    log_post = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    coef1 = betas * np.sqrt(ab_prev) / (1 - ab)
    log_model = (
        log_post if variance == "small" else np.concatenate([log_post[:1], np.log(betas[1:])])
    )
    v = S**2 * (1 - ab) / (ab * S**2 + 1 - ab)
    kl = 0.5 * (
        log_model - log_post + np.exp(log_post - log_model) - 1 + coef1**2 * v / np.exp(log_model)
    )
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    e = nodes * np.sqrt(v[0])
    inv = np.exp(-0.5 * log_model[0])
    prob = np_cdf(inv * (e + 1 / 255)) - np_cdf(inv * (e - 1 / 255))
    decoder = -(weights * np.log(np.maximum(prob, 1e-12))).sum() / weights.sum()
    mu2 = float((MU**2).mean()) + S**2
    prior = 0.5 * (-np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * mu2 - 1)
    parts = {"kl": kl[1:].sum(), "decoder": decoder, "prior": prior}
    parts = {k: float(v) / math.log(2) for k, v in parts.items()}
    return {**parts, "bpd": sum(parts.values())}


def check_against_closed_form(name: str, variance: str, images: int, tolerance: float):
    """Each part of the bound to `tolerance` relative. Every term is one Monte-Carlo draw per
    pixel: L_0 varies most, so it is checked on 4M pixels (one network call), the T-call loop
    on `images` 32x32 images."""
    schedule = getattr(NoiseSchedule, name)(1000)
    want = analytic_bpd(schedule, variance)
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(images, 1, 32, 32, generator=g, dtype=torch.float64)
    model = exact_model(schedule)
    got = bpd_exact(model, schedule, x0, variance, generator=g, clip_x0=False)
    kl = got["terms"][:, 1:].sum(1).mean().item()
    assert abs(kl / want["kl"] - 1) < tolerance, (kl, want)
    # L_T is ~1e-6 bits here: checked against the total, not its own size
    assert abs(got["prior"].mean().item() - want["prior"]) < tolerance * want["bpd"]
    assert torch.allclose(got["bpd"], got["terms"].sum(1) + got["prior"])
    assert torch.equal(got["decoder"], got["terms"][:, 0]) and got["terms"].shape == (images, 1000)

    many = MU + S * torch.randn(4096, 1, 32, 32, generator=g, dtype=torch.float64)
    precise, t0 = float64(schedule, "cpu"), torch.zeros(len(many), dtype=torch.long)
    x_1 = precise.q_sample(many, t0, torch.randn(many.shape, generator=g, dtype=torch.float64))
    log_variance = reverse_log_variance(precise, t0, many.ndim, variance)
    decoder = vb_term_bpd(precise, many, x_1, t0, model(x_1, t0)[0], log_variance, clip_x0=False)
    assert abs(decoder.mean().item() / want["decoder"] - 1) < 1e-3, (decoder.mean(), want)
    total = kl + got["prior"].mean().item() + decoder.mean().item()
    assert abs(total / want["bpd"] - 1) < tolerance


@pytest.mark.parametrize(("name", "variance"), [("linear", "large"), ("cosine", "small")])
def test_exact_bound_of_gaussian_data_is_near_the_closed_form(name, variance):
    # 16 images: the KL sum's Monte-Carlo error is ~0.3 %
    check_against_closed_form(name, variance, images=16, tolerance=1e-2)


@pytest.mark.slow
def test_exact_bound_of_gaussian_data_equals_the_closed_form_to_1e3():
    # 1024 images: the KL sum's Monte-Carlo error is ~0.03 %
    check_against_closed_form("linear", "large", images=1024, tolerance=1e-3)


def test_estimated_bound_is_unbiased_and_close():
    """The two-call estimate (importance-sampled t) averages to the exact bound."""
    schedule = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(64, 1, 32, 32, generator=g, dtype=torch.float64)
    model = exact_model(schedule)
    estimates = torch.cat(
        [bpd_estimate(model, schedule, x0, "large", generator=g, clip_x0=False) for _ in range(8)]
    )
    want = analytic_bpd(schedule, "large")["bpd"]
    standard_error = estimates.std().item() / len(estimates) ** 0.5
    assert abs(estimates.mean().item() - want) < 4 * standard_error + 1e-3 * want
    assert estimates.std().item() / want < 0.5  # one batch of 64 is within a few percent


def test_formulas_match_improved_diffusion():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    want = 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), want.clone().detach(), rtol=1e-12)

    x = torch.randint(0, 256, (1000,), generator=g).double() / 127.5 - 1
    mean = x + 0.05 * torch.randn(1000, generator=g, dtype=torch.float64)
    log_scale = torch.full((1000,), -3.0, dtype=torch.float64)
    xn, mn, inv = x.numpy(), mean.numpy(), np.exp(3.0)
    plus, minus = np_cdf(inv * (xn - mn + 1 / 255)), np_cdf(inv * (xn - mn - 1 / 255))
    log_probs = np.where(
        xn < -0.999,
        np.log(np.maximum(plus, 1e-12)),
        np.where(
            xn > 0.999,
            np.log(np.maximum(1 - minus, 1e-12)),
            np.log(np.maximum(plus - minus, 1e-12)),
        ),
    )
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    assert np.allclose(got.numpy(), log_probs, rtol=1e-10)
    assert (x == -1).any() and (x == 1).any()  # both end bins were exercised


def test_learned_variance_interpolates_between_the_fixed_ones():
    schedule = NoiseSchedule.linear(1000)
    t = torch.tensor([0, 10, 500, 999])
    small = reverse_log_variance(schedule, t, 2, "small")
    large = reverse_log_variance(schedule, t, 2, "large")
    v = torch.tensor([-1.0, 1.0, 0.0, 0.5]).reshape(4, 1)
    learned = reverse_log_variance(schedule, t, 2, "learned", v)
    log_betas = torch.log(schedule.betas[t]).reshape(4, 1)
    assert torch.allclose(learned[0], small[0]) and torch.allclose(learned[1], log_betas[1])
    assert torch.allclose(learned[2], (small[2] + log_betas[2]) / 2)
    assert bool((small[1:] <= large[1:]).all())
    with pytest.raises(ValueError, match="variance must be one of"):
        reverse_log_variance(schedule, t, 2, "medium")


def test_learned_term_of_l_hybrid_is_the_bound_with_the_learned_variance():
    """L_hybrid's L_vlb term: vb_term_bpd under the learned variance, x̂_0 unclipped, in float32;
    v = -1 is the term of σ² = β̃ and v = +1 that of σ² = β."""
    schedule = NoiseSchedule.linear(100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 50, 99])
    x_t = schedule.q_sample(x0, t, eps)
    eps_hat = 1.5 * eps  # a wrong ε̂, so the terms are not 0, and x̂_0 leaves [-1, 1]
    small = reverse_log_variance(schedule, t, 4, "small")
    large = torch.log(schedule.betas[t]).reshape(4, 1, 1, 1)
    for v_value, logvar in ((-1.0, small), (1.0, large)):
        v = torch.full(x0.shape, v_value, dtype=torch.float64)
        got = learned_vb_term_bpd(schedule, x0.double(), x_t.double(), t, eps_hat, v)
        want = vb_term_bpd(schedule, x0, x_t, t, eps_hat, logvar, clip_x0=False)
        assert got.dtype == torch.float32 and bool((got > 0).all())
        torch.testing.assert_close(got, want)


def guessing_model(schedule: NoiseSchedule, guess: torch.Tensor):
    """A model whose x̂_0 at t is guess[t] (T, C, H, W), whatever x_t: ε̂ = (x_t - √ᾱ_t guess[t])
    / √(1 - ᾱ_t). Every term of the bound is then a function of x_0 alone (x_t cancels from
    μ̃ - μ_θ = c1 (x_0 - x̂_0), and at t = 0 μ_θ = x̂_0): `bpd_exact` is each image's bound with
    no ε in it, and the estimate's only randomness is its draw of t."""
    a_bar = schedule.alphas_cumprod64

    def denoiser(x, t):
        a = a_bar[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * guess[t]) / (1 - a).sqrt(), None

    return denoiser


def test_estimated_bound_is_each_images_own_bound():
    """Issue 26: the mean over draws of each image's estimate is within 3 standard errors of its
    own exact bound, for a batch of 4 different images in fixed order. (The former stratified
    draw, which tied image i to slice i of p(t), failed it: z = +107, -0.2, -173, -2620.)"""
    T, draws = 200, 250
    schedule = NoiseSchedule.linear(T)
    ramp = torch.linspace(-0.8, 0.8, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
    fade = torch.linspace(1, 0, T, dtype=torch.float64).reshape(T, 1, 1, 1)
    model = guessing_model(schedule, 0.9 * ramp * fade)  # a guess that fades to 0 with t
    g = torch.Generator().manual_seed(0)
    checker = (torch.arange(64).reshape(8, 8) % 2 * 2 - 1).double() * 0.7
    x0 = torch.stack([ramp[0], -ramp[0], torch.full_like(ramp[0], 0.5), checker[None]])
    bound = bpd_exact(model, schedule, x0, "large", generator=g)["bpd"]
    again = bpd_exact(model, schedule, x0, "large", generator=g)["bpd"]
    torch.testing.assert_close(again, bound, rtol=1e-9, atol=0)  # no ε in it: exact
    estimates = torch.stack(
        [
            bpd_estimate(model, schedule, x0, "large", generator=torch.Generator().manual_seed(k))
            for k in range(draws)
        ]
    )
    standard_error = estimates.std(0) / draws**0.5
    z = (estimates.mean(0) - bound) / standard_error
    assert bool((z.abs() < 3).all()), (bound, estimates.mean(0), z)
    assert bool(bound.max() > 2 * bound.min()), bound  # different images, different bounds


def test_importance_draw_keeps_one_t_per_stratum_and_its_seed():
    """The batch's uniforms fill the B strata one each (the stratification's lower variance of
    the batch mean, bench/bpd_estimator.py), assigned to images at random, from the seed."""
    T, B = 1000, 64
    p = 1.0 / torch.arange(1, T, dtype=torch.float64)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(p / p.sum(), 0)])
    t, p_t = importance_timesteps(B, T, torch.Generator().manual_seed(3))
    torch.testing.assert_close(p_t, (p / p.sum())[t - 1], rtol=0, atol=0)
    # sorted, the k-th t's slice [F(t-1), F(t)] of the CDF meets stratum [k/B, (k+1)/B)
    k = torch.arange(B, dtype=torch.float64)
    ts = t.sort().values
    assert bool(((cdf[ts - 1] < (k + 1) / B) & (cdf[ts] >= k / B)).all())
    again, _ = importance_timesteps(B, T, torch.Generator().manual_seed(3))
    other, _ = importance_timesteps(B, T, torch.Generator().manual_seed(4))
    assert torch.equal(again, t) and not torch.equal(other, t)
    assert not torch.equal(t, ts)  # image i is not tied to stratum i
    loose, _ = importance_timesteps(B, T, torch.Generator().manual_seed(3), stratified=False)
    loose = loose.sort().values
    assert not bool(((cdf[loose - 1] < (k + 1) / B) & (cdf[loose] >= k / B)).all())


def test_bound_tables_start_from_float64_betas():
    """`float64` rebuilds the tables from the schedule's float64 β and ᾱ, whatever its buffers
    were cast to (bf16 here): bit for bit the tables of a float64 schedule."""
    schedule = NoiseSchedule.cosine(1000)
    want = NoiseSchedule(schedule.betas64, "cosine", torch.float64)
    got = float64(schedule.to(torch.bfloat16), "cpu")
    for name, table in want.named_buffers():
        assert torch.equal(getattr(got, name), table), name
