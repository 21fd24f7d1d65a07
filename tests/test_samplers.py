import math

import numpy as np
import pytest
import torch
from torch import Tensor

import bench.ode_error as ode_bench
from bench.ode_error import diffusers_dpmpp, edm_continuous
from ddpm.grids import timesteps
from ddpm.objectives import Prediction
from ddpm.samplers import (
    SAMPLERS,
    image_generators,
    randn,
    sample_abm,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_edm,
    sampler_label,
    sampler_settings,
)
from ddpm.schedule import NoiseSchedule


def dummy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A model of known output (diffusers' test trick): ε = x · t / (t + 1)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * t / (t + 1)


def fixed(eps_fn):
    """An ε function as a denoiser of fixed variance: (x_t, t) -> Prediction(ε, None)."""
    return lambda x, t: Prediction(eps_fn(x, t))


def test_a_bare_eps_is_refused():
    """A denoiser returns (ε, v): a bare ε (2, ...) would unpack into two half-batches."""
    x_T = torch.randn(2, 1, 4, 4)
    for sampler in SAMPLERS.values():
        with pytest.raises(TypeError, match=r"returns \(ε, v or None\).*got a Tensor"):
            sampler(dummy_eps, NoiseSchedule.linear(10), x_T, 2)


def reference_ddpm(x_T, betas, seeds, variance):
    """Algorithm 2 of Ho et al. in float64, written out step by step (no clipping)."""
    betas = betas.double()
    alphas = 1 - betas
    a_bar = torch.cumprod(alphas, 0)
    gens = image_generators(*seeds)
    x = x_T.double()
    for t in reversed(range(len(betas))):
        eps = dummy_eps(x, torch.full((x.shape[0],), t))
        mean = (x - betas[t] / (1 - a_bar[t]).sqrt() * eps) / alphas[t].sqrt()
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).double()
        if variance == "large":
            sigma2 = betas[t]
        else:
            a_prev = a_bar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
            sigma2 = (1 - a_prev) / (1 - a_bar[t]) * betas[t]
        x = mean + (sigma2.sqrt() * z if t > 0 else 0)
    return x


@pytest.mark.parametrize("variance", ["large", "small"])
def test_ddpm_matches_algorithm_2(variance):
    schedule = NoiseSchedule.linear(20, 1e-3, 0.2)
    seeds = (7, 0, 3)
    x_T = randn((3, 1, 4, 4), image_generators(*seeds), "cpu")
    got = sample_ddpm(
        fixed(dummy_eps),
        schedule,
        x_T,
        20,
        generator=image_generators(*seeds),
        variance=variance,
        clip_x0=False,
    )
    want = reference_ddpm(x_T, schedule.betas, seeds, variance)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)


def test_ddpm_is_deterministic_given_seed_and_uses_noise():
    schedule = NoiseSchedule.linear(50)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sample_ddpm(fixed(dummy_eps), schedule, x_T, 50, generator=image_generators(1, 0, 2))
    b = sample_ddpm(fixed(dummy_eps), schedule, x_T, 50, generator=image_generators(1, 0, 2))
    c = sample_ddpm(fixed(dummy_eps), schedule, x_T, 50, generator=image_generators(2, 0, 2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_callback_sees_every_step_in_order():
    schedule = NoiseSchedule.linear(1000)
    seen = []
    sample_ddpm(
        fixed(dummy_eps),
        schedule,
        torch.randn(1, 1, 2, 2),
        10,
        callback=lambda i, t, x, x0: seen.append((i, int(t[0]))),
    )
    assert [i for i, _ in seen] == list(range(10))
    assert seen[0][1] == 999 and seen[-1][1] == 0
    assert [t for _, t in seen] == sorted((t for _, t in seen), reverse=True)


def test_timestep_spacing():
    assert torch.equal(timesteps(1000, 1000), torch.arange(1000))
    uniform = timesteps(1000, 10)
    assert uniform[0] == 0 and uniform[-1] == 999 and len(uniform) == 10
    quad = timesteps(1000, 10, "quadratic")
    assert quad[1] < uniform[1]  # packed near t = 0
    for steps in (10, 20, 50, 100, 200, 1000):  # the DDIM table's step counts, and all of T
        quad = timesteps(1000, steps, "quadratic")
        assert len(quad) == steps and quad[0] == 0 and quad[-1] == 999
        assert torch.all(quad[1:] > quad[:-1])
    with pytest.raises(ValueError, match="steps must be in"):
        timesteps(1000, 0)
    with pytest.raises(ValueError, match="steps must be in"):
        timesteps(100, 101)


def test_per_image_noise_does_not_depend_on_batch():
    whole = randn((4, 1, 3, 3), image_generators(5, 0, 4), "cpu")
    parts = torch.cat([randn((2, 1, 3, 3), image_generators(5, k, 2), "cpu") for k in (0, 2)])
    assert torch.equal(whole, parts)


def test_clipping_keeps_x0_in_range():
    schedule = NoiseSchedule.linear(100)
    x0s = []
    sample_ddpm(
        fixed(lambda x, t: -10 * torch.ones_like(x)),
        schedule,
        torch.randn(2, 1, 4, 4),
        100,
        callback=lambda i, t, x, x0: x0s.append(x0),
    )
    assert all(x0.abs().max() <= 1 for x0 in x0s)


def _a_bar64(schedule: NoiseSchedule) -> torch.Tensor:
    return torch.cumprod(1 - schedule.betas.double(), 0)


def reference_ddim(x_T, schedule, ts, eta, seeds):
    """Song et al. 2021 eq. 12 in float64, σ from eq. 16, no clipping."""
    a_bar = _a_bar64(schedule)
    gens = image_generators(*seeds) if seeds else None
    x = x_T.double()
    ts = ts.tolist()
    for k in reversed(range(len(ts))):
        t = ts[k]
        a, a_prev = (
            a_bar[t],
            (a_bar[ts[k - 1]] if k > 0 else torch.tensor(1.0, dtype=torch.float64)),
        )
        eps = dummy_eps(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        if k > 0 and sigma > 0:
            x = (
                x
                + sigma
                * torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).double()
            )
    return x


@pytest.mark.parametrize(
    ("eta", "spacing"), [(0.0, "uniform"), (0.0, "quadratic"), (0.5, "uniform")]
)
def test_ddim_matches_eq_12(eta, spacing):
    schedule = NoiseSchedule.linear(1000)
    seeds = (3, 0, 2)
    x_T = randn((2, 1, 4, 4), image_generators(*seeds), "cpu")
    got = sample_ddim(
        fixed(dummy_eps),
        schedule,
        x_T,
        10,
        generator=image_generators(*seeds),
        eta=eta,
        spacing=spacing,
        clip_x0=False,
    )
    want = reference_ddim(x_T, schedule, timesteps(1000, 10, spacing), eta, seeds)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta_1_all_steps_is_ddpm(clip):
    schedule = NoiseSchedule.linear(100, 1e-3, 0.1)
    x_T = randn((2, 1, 4, 4), image_generators(0, 0, 2), "cpu")
    ddim = sample_ddim(
        fixed(dummy_eps),
        schedule,
        x_T,
        100,
        generator=image_generators(1, 0, 2),
        eta=1.0,
        clip_x0=clip,
    )
    ddpm = sample_ddpm(
        fixed(dummy_eps),
        schedule,
        x_T,
        100,
        generator=image_generators(1, 0, 2),
        variance="small",
        clip_x0=clip,
    )
    assert torch.allclose(ddim, ddpm, atol=1e-4)


def reference_dpmpp_2m(x_T, schedule, ts):
    """Lu et al. 2022, Algorithm 2 (DPM-Solver++(2M)) in float64 with λ = log(α/σ), with the
    first-order last step into t = 0 of their reference code (lower_order_final)."""
    a_bar = _a_bar64(schedule)
    seq = list(reversed(ts.tolist()))
    alpha = lambda t: a_bar[t].sqrt()  # noqa: E731
    sigma = lambda t: (1 - a_bar[t]).sqrt()  # noqa: E731
    lam = lambda t: torch.log(alpha(t) / sigma(t))  # noqa: E731
    x = x_T.double()
    data = lambda x, t: (x - sigma(t) * dummy_eps(x, torch.full((x.shape[0],), t))) / alpha(t)  # noqa: E731
    prev = None
    for i, t in enumerate(seq):
        x0 = data(x, t)
        if i == len(seq) - 1:
            return x0
        s = seq[i + 1]
        h = lam(s) - lam(t)
        if prev is None or i == len(seq) - 2:
            d = x0
        else:
            r = prev[1] / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev[0]
        x = sigma(s) / sigma(t) * x - alpha(s) * (torch.exp(-h) - 1) * d
        prev = (x0, h)
    return x


def test_dpmpp_2m_matches_algorithm_2():
    schedule = NoiseSchedule.cosine(1000)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    got = sample_dpmpp_2m(fixed(dummy_eps), schedule, x_T, 12, clip_x0=False)
    want = reference_dpmpp_2m(x_T, schedule, timesteps(1000, 12, "logsnr", schedule.alphas_cumprod))
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "sampler", [sample_ddim, sample_dpmpp_2m, sample_dpmpp_3m, sample_edm, sample_abm]
)
def test_deterministic_samplers_ignore_the_generator(sampler):
    schedule = NoiseSchedule.linear(1000)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sampler(fixed(dummy_eps), schedule, x_T, 15, generator=image_generators(1, 0, 2))
    b = sampler(fixed(dummy_eps), schedule, x_T, 15, generator=image_generators(9, 0, 2))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("sampler", "steps"),
    [
        (sample_ddpm, 50),
        (sample_ddpm, 1000),
        (sample_ddim, 10),
        (sample_dpmpp_2m, 10),
        (sample_dpmpp_3m, 10),
        (sample_edm, 10),
        (sample_abm, 10),
        (sample_abm, 2),
    ],
)
def test_exact_denoiser_of_a_point_mass_lands_on_it(sampler, steps):
    """If the data is one image x*, ε(x_t, t) = (x_t - √ᾱ_t x*) / √(1 - ᾱ_t) exactly; every
    sampler must then end on x*."""
    schedule = NoiseSchedule.linear(1000)
    target = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    a_bar = schedule.alphas_cumprod

    def exact(x, t):
        a = a_bar[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sampler(fixed(exact), schedule, x_T, steps, generator=image_generators(0, 0, 3))
    assert torch.allclose(out, target.expand_as(out), atol=1e-3)


def test_one_name_for_a_sampler_setting():
    assert sampler_label({"sampler": "ddim", "steps": 50}, 1000) == "ddim50"
    assert sampler_label({"sampler": "ddpm", "steps": None}, 1000) == "ddpm1000"  # all T steps
    assert sampler_label(sampler_settings({"name": "dpmpp_2m", "steps": 20}), 400) == "dpmpp_2m20"


@pytest.mark.parametrize(
    "sampler", [sample_ddim, sample_dpmpp_2m, sample_ddpm, sample_dpmpp_3m, sample_edm, sample_abm]
)
def test_one_step_starts_from_pure_noise(sampler):
    """steps=1 evaluates the model at t = T - 1, where x_T is: with the exact denoiser of
    N(μ, s²) data its one step lands on E[x_0 | x_T], close to μ (not the noise itself)."""
    schedule = NoiseSchedule.linear(1000)
    a_bar = schedule.alphas_cumprod.double()
    mu, s = 0.3, 0.5
    seen = []

    def eps_star(x, t):
        seen.append(int(t[0]))
        a = a_bar[t].reshape(-1, 1, 1, 1).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler(fixed(eps_star), schedule, x_T, 1, clip_x0=False)
    assert timesteps(1000, 1).tolist() == [999] and seen == [999]
    assert abs(out.mean().item() - mu) < 0.01 and out.std().item() < 0.05


# ---------------------------------------------------------------- the exact ODE of Gaussian data
# For data N(μ, s²I) the noised marginal is N(α μ, (α² s² + σ²) I) and the exact denoiser is
# ε*(x_t, t) = σ (x_t - α μ) / (α² s² + σ²). The probability-flow ODE keeps
# z = (x_t - α μ) / √(α² s² + σ²) fixed, so from x_T its state at t = 0 is known in closed form;
# every sampler ends with x̂_0 at t = 0, so the target is that x̂_0 of the exact state.
GAUSS_MU = torch.linspace(-0.6, 0.6, 2000, dtype=torch.float64)
GAUSS_S = 0.6


def gaussian_eps(schedule: NoiseSchedule, mu=GAUSS_MU, s=GAUSS_S):
    a_bar = schedule.alphas_cumprod.double()

    def eps(x, t):
        a = a_bar[t].reshape(-1, *[1] * (x.ndim - 1))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return eps


def ode_end(schedule: NoiseSchedule, x_T: Tensor) -> Tensor:
    a_bar = schedule.alphas_cumprod.double()
    a_T, a_0 = a_bar[-1], a_bar[0]
    z = (x_T - a_T.sqrt() * GAUSS_MU) / (a_T * GAUSS_S**2 + 1 - a_T).sqrt()
    x_0 = a_0.sqrt() * GAUSS_MU + (a_0 * GAUSS_S**2 + 1 - a_0).sqrt() * z  # exact state at t = 0
    eps = gaussian_eps(schedule)(x_0, torch.zeros(x_0.shape[0], dtype=torch.long))
    return (x_0 - (1 - a_0).sqrt() * eps) / a_0.sqrt()


def ode_errors(sampler, schedule, steps_list, **options):
    x_T = torch.randn(1, GAUSS_MU.numel(), generator=torch.Generator().manual_seed(0)).double()
    want = ode_end(schedule, x_T)
    eps = gaussian_eps(schedule)
    return [
        (sampler(fixed(eps), schedule, x_T, n, clip_x0=False, **options) - want).abs().max().item()
        for n in steps_list
    ]


def order(steps_list, errors) -> float:
    """The least-squares slope of -log(error) against log(steps): the observed order."""
    x, y = np.log(steps_list), -np.log(errors)
    return float(np.polyfit(x, y, 1)[0])


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_deterministic_samplers_converge_to_the_exact_ode_end_at_their_order(name):
    schedule = getattr(NoiseSchedule, name)(1000)
    steps = [10, 20, 50, 100, 200]
    ddim = ode_errors(sample_ddim, schedule, steps)
    dpmpp = ode_errors(sample_dpmpp_2m, schedule, steps)
    # DDIM is Euler's method on the ODE in λ: first order
    assert 0.9 < order(steps, ddim) < 1.15, ddim
    # DPM-Solver++(2M): second order once in the asymptotic range, and better at every count
    assert order(steps[2:], dpmpp[2:]) > 1.8, dpmpp
    assert all(b < a for a, b in zip(dpmpp[1:-1], dpmpp[2:], strict=True)), dpmpp
    assert all(p < d for p, d in zip(dpmpp, ddim, strict=True)), (dpmpp, ddim)


def test_uniform_t_spacing_stalls_dpmpp_at_the_last_lambda_gap():
    """Why `logsnr` is DPM++'s default: on uniform t the step into t = 0 spans a λ gap of
    about ½·log(1 + T/steps), so from 100 steps on the error no longer falls at 2nd order."""
    schedule = NoiseSchedule.linear(1000)
    uniform = ode_errors(sample_dpmpp_2m, schedule, [100, 200], spacing="uniform")
    logsnr = ode_errors(sample_dpmpp_2m, schedule, [100, 200], spacing="logsnr")
    assert uniform[0] / uniform[1] < 3.5 < logsnr[0] / logsnr[1], (uniform, logsnr)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_logsnr_spacing_is_even_in_lambda(name):
    schedule = getattr(NoiseSchedule, name)(1000)
    a_bar = schedule.alphas_cumprod.double()
    lam = 0.5 * torch.log(a_bar / (1 - a_bar))
    for steps in (10, 20, 50, 500, 999, 1000):
        ts = timesteps(1000, steps, "logsnr", schedule.alphas_cumprod)
        assert len(ts) == steps and ts[0] == 0 and ts[-1] == 999 and bool((ts.diff() > 0).all())
    gaps = -lam[timesteps(1000, 20, "logsnr", schedule.alphas_cumprod)].diff()[1:-1]
    assert gaps.max() / gaps.min() < 1.5  # even, up to rounding t to integers
    with pytest.raises(ValueError, match="alphas_cumprod"):
        timesteps(1000, 20, "logsnr")


STOCHASTIC = {
    "ddpm_small": (sample_ddpm, {"variance": "small"}),
    "ddpm_large": (sample_ddpm, {"variance": "large"}),
    "ddim_eta1": (sample_ddim, {"eta": 1.0}),
}


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_reach_the_data_distribution(name):
    """With all T steps and the exact denoiser, the samples' mean and std per pixel are the
    data's μ and s (to the Monte-Carlo error of 20,000 samples)."""
    sampler, options = STOCHASTIC[name]
    schedule = NoiseSchedule.linear(1000)
    mu, s = torch.linspace(-0.6, 0.6, 8, dtype=torch.float64), 0.3
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(20_000, 8, generator=g, dtype=torch.float64)
    out = sampler(
        fixed(gaussian_eps(schedule, mu, s)),
        schedule,
        x_T,
        1000,
        generator=g,
        clip_x0=False,
        **options,
    )
    standard_error = s / 20_000**0.5
    assert (out.mean(0) - mu).abs().max() < 4 * standard_error
    assert (out.std(0) / s - 1).abs().max() < 0.025


def test_respaced_ddpm_variances_bracket_the_data_variance():
    """On 50 respaced steps σ² = β̃ undershoots the data's spread and σ² = β overshoots it
    (Ho et al. Sec. 3.2: the two extremes of the reverse variance)."""
    schedule = NoiseSchedule.linear(1000)
    mu, s = torch.zeros(8, dtype=torch.float64), 0.3
    stds = []
    for variance in ("small", "large"):
        g = torch.Generator().manual_seed(1)
        x_T = torch.randn(20_000, 8, generator=g, dtype=torch.float64)
        out = sample_ddpm(
            fixed(gaussian_eps(schedule, mu, s)),
            schedule,
            x_T,
            50,
            generator=g,
            variance=variance,
            clip_x0=False,
        )
        stds.append(out.std(0).mean().item())
    assert stds[0] < 0.97 * s and stds[1] > 1.03 * s, stds


# ------------------------------------------------ DPM-Solver++(3M) and EDM (issue 26, part 5)
def _a_bar_chain(schedule: NoiseSchedule) -> Tensor:
    """ᾱ as `respace` builds the samplers' chains: the schedule's float64 copy."""
    return schedule.alphas_cumprod64


def _slope_and_curvature(points: list[tuple[float, Tensor]], lam_t: float, h: float):
    """(a, b) of the quadratic a0 + a u + b u² (u = (λ - λ_t)/h) through the three points."""
    u = torch.tensor([(lam - lam_t) / h for lam, _ in points], dtype=torch.float64)
    vandermonde = torch.stack([torch.ones(3, dtype=torch.float64), u, u**2], 1)
    values = torch.stack([v.flatten() for _, v in points])
    coef = torch.linalg.solve(vandermonde, values)
    shape = points[-1][1].shape
    return coef[1].reshape(shape), coef[2].reshape(shape)


def reference_dpmpp_3m(x_T, schedule, ts, final="x0"):
    """DPM-Solver++(3M) written as an integral, in float64: a 3rd-order step is the exponential
    integrator x_s = (σ_s/σ_t) x_t + σ_s ∫ e^λ P(λ) dλ over [λ_t, λ_s] (Gauss-Legendre), P =
    x̂_0 + a u + ½ b u², u = (λ - λ_t)/h, with a u + b u² the quadratic through the last three
    (λ, x̂_0): the authors' D1 = a and D2 = b under their weight φ_3 = (e^-h - 1 + h)/h² - ½,
    which is the Taylor weight of h²·x̂_0'' = 2b, so the curvature enters at half its size.
    k = 2 steps are Algorithm 2's, k = 1 DDIM; order min(3, history, steps left). The sample:
    x̂_0 at t = 0, or ("extrapolated") the line through the last two (σ², x̂_0), σ² = (1-ᾱ)/ᾱ,
    read at σ² = 0."""
    a_bar = _a_bar_chain(schedule)
    nodes, weights = np.polynomial.legendre.leggauss(20)
    seq = list(reversed(ts.tolist()))
    x, points = x_T.double(), []  # (λ, x̂_0) newest last
    for i, t in enumerate(seq):
        a = a_bar[t]
        x0 = (x - (1 - a).sqrt() * dummy_eps(x, torch.full((x.shape[0],), t))) / a.sqrt()
        if i == len(seq) - 1:
            if final == "x0":
                return x0
            (sq1, x1), sq0 = points[-1], (1 - a) / a  # points[-1]: (λ, x̂_0) at the step before
            sq1 = math.exp(-2 * sq1)  # σ² = e^(-2λ)
            return x0 + (x1 - x0) * (0 - sq0) / (sq1 - sq0)
        a_s = a_bar[seq[i + 1]]
        lam_t, lam_s = [0.5 * math.log(v / (1 - v)) for v in (a.item(), a_s.item())]
        points.append((lam_t, x0))
        k = min(3, len(points), len(seq) - 1 - i)
        h = lam_s - lam_t
        if k == 3:
            slope, curvature = _slope_and_curvature(points[-3:], lam_t, h)
            integral = sum(
                wq
                * h
                / 2
                * math.exp(lam_t + h * (1 + u) / 2)
                * (x0 + slope * (1 + u) / 2 + curvature / 2 * ((1 + u) / 2) ** 2)
                for u, wq in zip(nodes, weights, strict=True)
            )
            x = (1 - a_s).sqrt() / (1 - a).sqrt() * x + (1 - a_s).sqrt() * integral
        else:
            d = x0
            if k == 2:
                r = (lam_t - points[-2][0]) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * points[-2][1]
            x = (1 - a_s).sqrt() / (1 - a).sqrt() * x - a_s.sqrt() * math.expm1(-h) * d
    return x


@pytest.mark.parametrize(
    "spacing, final", [("angle", "x0"), ("logsnr", "x0"), ("broad", "extrapolated")]
)
def test_dpmpp_3m_is_the_authors_update_written_as_an_integral(spacing, final):
    schedule = NoiseSchedule.cosine(1000)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sample_dpmpp_3m(
        fixed(dummy_eps), schedule, x_T, 12, clip_x0=False, spacing=spacing, final=final
    )
    ts = timesteps(1000, 12, spacing, schedule.alphas_cumprod)
    want = reference_dpmpp_3m(x_T, schedule, ts, final)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    if final == "extrapolated":  # it moves the sample (by ~1e-3 here: the 1e-9 above tells it
        # from x̂_0 at t = 0), by less than a tenth of the whole path
        plain = sample_dpmpp_3m(
            fixed(dummy_eps), schedule, x_T, 12, clip_x0=False, spacing=spacing, final="x0"
        )
        assert 1e-4 < (plain - got).abs().max() < 0.1 * (plain - x_T).abs().max()


def test_dpmpp_3m_refuses_an_unknown_final_step_by_name():
    calls = []
    with pytest.raises(ValueError, match=r"sampler.final='zero'.*'x0'.*'extrapolated'"):
        sample_dpmpp_3m(
            lambda x, t: calls.append(1),
            NoiseSchedule.linear(10),
            torch.zeros(1, 2),
            3,
            final="zero",
        )
    assert calls == []


def test_broad_spacing_is_even_in_its_warped_angle():
    """`broad`: even in arctan(e^(-w(λ - c))), c = 1.5, w = 0.4; denser than `angle` at λ > 2,
    where x̂_0 of data of std < 0.3 still changes."""
    c, w = 1.5, 0.4
    for name in ("linear", "cosine"):
        a_bar = getattr(NoiseSchedule, name)(1000).alphas_cumprod
        lam = 0.5 * torch.log(a_bar.double() / (1 - a_bar.double()))
        for steps in (10, 100, 999, 1000):
            ts = timesteps(1000, steps, "broad", a_bar)
            assert len(ts) == steps and ts[0] == 0 and ts[-1] == 999 and bool((ts.diff() > 0).all())
        ts = timesteps(1000, 20, "broad", a_bar)
        gaps = torch.atan(torch.exp(-w * (lam[ts] - c))).diff()[3:-1]
        # up to rounding t to integers, which near t = 0 (first gaps) are wide steps in λ
        assert gaps.max() / gaps.min() < 1.3, (name, gaps)
        angle = timesteps(1000, 20, "angle", a_bar)
        assert (lam[ts] > 2).sum() > (lam[angle] > 2).sum(), (name, ts, angle)


def test_angle_spacing_is_even_in_phi():
    """φ = arctan(σ/α): even steps in it are even steps in t on the cosine schedule."""
    for name in ("linear", "cosine"):
        schedule = getattr(NoiseSchedule, name)(1000)
        a_bar = schedule.alphas_cumprod.double()
        for steps in (10, 100, 999, 1000):
            ts = timesteps(1000, steps, "angle", schedule.alphas_cumprod)
            assert len(ts) == steps and ts[0] == 0 and ts[-1] == 999 and bool((ts.diff() > 0).all())
        phi = torch.atan(((1 - a_bar) / a_bar).sqrt())[timesteps(1000, 20, "angle", a_bar)]
        gaps = phi.diff()[1:-1]
        assert gaps.max() / gaps.min() < 1.3, (name, gaps)  # up to rounding t to integers
    cosine = timesteps(1000, 20, "angle", NoiseSchedule.cosine(1000).alphas_cumprod)
    assert (cosine - timesteps(1000, 20, "uniform")).abs().max() <= 8  # the offset s = 0.008


def exact_ode_errors(sampler, name, steps_list, s=GAUSS_S, **options):
    """Max error against the σ = 0 end of the exact ODE (as bench/ode_error.py measures it),
    on 200 pixels of N(μ, s²) data (s = 0.6 unless given), float64, no clipping."""
    schedule = getattr(NoiseSchedule, name)(1000)
    a_bar = _a_bar_chain(schedule)
    mu = GAUSS_MU[::10]

    def eps(x, t):
        a = a_bar[t].reshape(-1, 1)
        return Prediction((1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a))

    x_T = torch.randn(1, mu.numel(), generator=torch.Generator().manual_seed(0)).double()
    a_T = a_bar[-1]
    end = mu + s * (x_T - a_T.sqrt() * mu) / (a_T * s**2 + 1 - a_T).sqrt()
    return [
        (sampler(eps, schedule, x_T, n, clip_x0=False, **options) - end).abs().max().item()
        for n in steps_list
    ]


ISSUE_STEPS = [10, 15, 20, 30, 50, 100]


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_dpmpp_3m_keeps_converging_and_beats_ddim_and_2m(name):
    """DPM++(2M) on logsnr steps barely moves from 10 to 15 steps (h ≈ 0.7-1 in λ where x̂_0
    changes: not yet its asymptotic range); 3M's default (broad steps, x̂_0 extrapolated to
    σ = 0) is far below DDIM and below 2M at every count, and falls over every doubling. On
    the linear schedule it falls at every count; on the cosine one its 15-step error is a
    zero crossing (1e-4), below its 20-step one (docs/samplers.md)."""
    best = exact_ode_errors(sample_dpmpp_3m, name, ISSUE_STEPS)
    ddim = exact_ode_errors(sample_ddim, name, ISSUE_STEPS)
    two = exact_ode_errors(sample_dpmpp_2m, name, ISSUE_STEPS)
    assert all(b < d / 4 for b, d in zip(best, ddim, strict=True)), (best, ddim)
    assert all(b < t for b, t in zip(best, two, strict=True)), (best, two)
    doubling = [best[ISSUE_STEPS.index(n)] for n in (10, 20, 50, 100)]
    assert all(b < a / 3 for a, b in zip(doubling, doubling[1:], strict=False)), best
    if name == "linear":
        assert all(b < a for a, b in zip(best, best[1:], strict=False)), best
    assert two[1] > 0.8 * two[0], two  # the stall


@pytest.mark.slow  # imports diffusers (~10 s) and runs it 36 times
@pytest.mark.parametrize("sampler", [sample_dpmpp_3m, sample_abm])
def test_best_samplers_against_diffusers_dpmpp_2m(monkeypatch, sampler):
    """Issue 26's bar: ≤ diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, its
    uniform t) at every count, on both schedules, for data of std 0.3, 0.6 and 1.0; ABM's error
    also falls at every count (3M's does not: tests/test_abm.py has the fast half of this)."""
    pytest.importorskip("diffusers")
    for name in ("linear", "cosine"):
        schedule = getattr(NoiseSchedule, name)(1000)
        a_bar = _a_bar_chain(schedule)
        mu = GAUSS_MU[::10]
        x_T = torch.randn(1, mu.numel(), generator=torch.Generator().manual_seed(0)).double()
        for s in (0.3, 0.6, 1.0):
            monkeypatch.setattr(ode_bench, "S", s)  # the bench's exact denoiser reads it
            end = mu + s * (x_T - a_bar[-1].sqrt() * mu) / (a_bar[-1] * s**2 + 1 - a_bar[-1]).sqrt()
            theirs = [
                (diffusers_dpmpp(schedule, x_T, n, mu=mu) - end).abs().max().item()
                for n in ISSUE_STEPS
            ]
            best = exact_ode_errors(sampler, name, ISSUE_STEPS, s=s)
            assert all(b <= d for b, d in zip(best, theirs, strict=True)), (name, s, best, theirs)
            if sampler is sample_abm:
                assert all(b < a for a, b in zip(best, best[1:], strict=False)), (name, s, best)


def reference_edm(x_T, schedule, ts):
    """Karras et al. 2022 Algorithm 1 in float64 on the given timesteps (the first step Euler,
    as from σ_T to σ_max), x_σ = x_t √(1 + σ²), D = x_σ - σ ε(x_t, t)."""
    a_bar = _a_bar_chain(schedule)
    sig = [((1 - a_bar[t]) / a_bar[t]).sqrt().item() for t in ts] + [0.0]

    def D(x, i):
        t = torch.full((x.shape[0],), ts[i])
        return x - sig[i] * dummy_eps(x / (1 + sig[i] ** 2) ** 0.5, t)

    x = x_T.double() * (1 + sig[0] ** 2) ** 0.5
    for i in range(len(ts)):
        d = (x - D(x, i)) / sig[i]
        x_next = x + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] > 0 and i > 0:
            x_next = x + (sig[i + 1] - sig[i]) * (d + (x_next - D(x_next, i + 1)) / sig[i + 1]) / 2
        x = x_next
    return x


def test_edm_is_algorithm_1_on_karras_sigmas_snapped_to_training_steps():
    schedule = NoiseSchedule.linear(1000)
    seen = []
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sample_edm(
        fixed(dummy_eps), schedule, x_T, 8, callback=lambda i, t, x, x0: seen.append(int(t[0]))
    )
    a_bar = _a_bar_chain(schedule)
    sigma = ((1 - a_bar) / a_bar).sqrt()
    assert seen[0] == 999 and seen[-1] == 0 and seen == sorted(seen, reverse=True)
    # eq. 5 from σ_max = 80 down to σ_min = σ(t = 0), each level the nearest training σ
    hi, lo = 80 ** (1 / 7), sigma[0].item() ** (1 / 7)
    for i, t in enumerate(seen[1:]):
        wanted = (hi + i / 6 * (lo - hi)) ** 7
        assert (sigma.log() - math.log(wanted)).abs().argmin() == t
    assert torch.allclose(got, reference_edm(x_T, schedule, seen), rtol=1e-10, atol=1e-10)


def test_edm_network_calls_and_its_continuous_grid():
    """2·steps - 2 calls (the first step is Euler), 2·steps - 1 from σ_T; snapping the grid to
    training steps moves the end of the exact ODE by < 1 % of the error (bench/ode_error.py's
    continuous-σ row)."""
    schedule = NoiseSchedule.cosine(1000)
    calls = []
    counting = lambda x, t: calls.append(1) or Prediction(dummy_eps(x, t))  # noqa: E731
    sample_edm(counting, schedule, torch.randn(1, 4), 10)
    sample_edm(counting, schedule, torch.randn(1, 4), 10, sigma_max=None)
    assert len(calls) == 18 + 19
    a_bar = _a_bar_chain(schedule)
    x_T = torch.randn(1, GAUSS_MU.numel(), generator=torch.Generator().manual_seed(0)).double()
    end = (
        GAUSS_MU
        + GAUSS_S
        * (x_T - a_bar[-1].sqrt() * GAUSS_MU)
        / (a_bar[-1] * GAUSS_S**2 + 1 - a_bar[-1]).sqrt()
    )
    assert torch.equal(ode_bench.MU, GAUSS_MU) and ode_bench.S == GAUSS_S  # the same data
    for n in (10, 20):
        snapped = sample_edm(fixed(gaussian_eps(schedule)), schedule, x_T, n)
        continuous = edm_continuous(schedule, x_T, n)
        error = (continuous - end).abs().max()
        assert (snapped - continuous).abs().max() < 0.01 * error


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_edm_converges_at_second_order(name):
    errors = exact_ode_errors(sample_edm, name, [25, 50, 100])
    assert order([25, 50, 100], errors) > 1.8, errors


def test_edm_churn_draws_from_the_per_image_generators():
    schedule = NoiseSchedule.linear(1000)
    x_T = randn((4, 1, 2, 2), image_generators(0, 0, 4), "cpu")
    churn = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    run = lambda gens, x=x_T: sample_edm(  # noqa: E731
        fixed(dummy_eps), schedule, x, 10, generator=gens, **churn
    )
    whole = run(image_generators(1, 0, 4))
    parts = torch.cat([run(image_generators(1, k, 2), x_T[k : k + 2]) for k in (0, 2)])
    assert torch.equal(whole, parts)  # image k is the same whatever batch drew it
    assert not torch.allclose(whole, run(image_generators(2, 0, 4)))
    deterministic = sample_edm(fixed(dummy_eps), schedule, x_T, 10)
    assert not torch.allclose(whole, deterministic)


@pytest.mark.slow  # 2 s: the churn's bias falls below 2.5 % of the spread from ~100 steps
def test_edm_with_churn_reaches_the_data_distribution():
    """Alg. 2 with the exact denoiser: mean and spread of N(μ, s²) data per pixel."""
    schedule = NoiseSchedule.linear(1000)
    mu, s = torch.linspace(-0.6, 0.6, 8, dtype=torch.float64), 0.3
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(20_000, 8, generator=g, dtype=torch.float64)
    out = sample_edm(
        fixed(gaussian_eps(schedule, mu, s)), schedule, x_T, 100, generator=g, s_churn=40.0
    )
    assert (out.mean(0) - mu).abs().max() < 4 * s / 20_000**0.5
    assert (out.std(0) / s - 1).abs().max() < 0.025


@pytest.mark.parametrize(
    ("option", "value"), [("rho", 0.0), ("s_churn", -1.0), ("s_noise", -0.1), ("sigma_max", 0)]
)
def test_edm_refuses_bad_options_by_name(option, value):
    calls = []
    with pytest.raises(ValueError, match=rf"{option}={value}"):
        sample_edm(
            lambda x, t: calls.append(1),
            NoiseSchedule.linear(10),
            torch.zeros(1, 2),
            3,
            **{option: value},
        )
    assert calls == []
