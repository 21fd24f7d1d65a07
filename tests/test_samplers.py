import numpy as np
import pytest
import torch
from torch import Tensor

from ddpm.objectives import Prediction
from ddpm.samplers import (
    image_generators,
    randn,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sampler_label,
    sampler_settings,
    timesteps,
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
    for sampler in (sample_ddpm, sample_ddim, sample_dpmpp_2m):
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


@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmpp_2m])
def test_deterministic_samplers_ignore_the_generator(sampler):
    schedule = NoiseSchedule.linear(1000)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sampler(fixed(dummy_eps), schedule, x_T, 15, generator=image_generators(1, 0, 2))
    b = sampler(fixed(dummy_eps), schedule, x_T, 15, generator=image_generators(9, 0, 2))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("sampler", "steps"),
    [(sample_ddpm, 50), (sample_ddpm, 1000), (sample_ddim, 10), (sample_dpmpp_2m, 10)],
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


@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmpp_2m, sample_ddpm])
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
