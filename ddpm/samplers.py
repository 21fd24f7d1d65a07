"""Samplers: plain functions with one signature.

    sample_xxx(denoiser, schedule, x_T, steps, *, generator=None, callback=None, ...) -> x_0

`denoiser(x_t, t) -> (ε, v)` for (B,) int64 timesteps of the training chain: ε (B, C, H, W),
and v (B, C, H, W) for a model with learned variances (it interpolates log β̃ .. log β; only
DDPM's variance uses it) or None (a `ddpm.objectives.Prediction`).
`callback(i, t, x_t, x0_pred)` is called after every step (i counts steps from 0), for animations.
`generator` is a torch.Generator, or one per image (see `image_generators`) so that image k of a
seed is the same whatever batch it was drawn in. DDPM, DDIM and DPM-Solver++ (2M, 3M) are
here, EDM's Heun sampler in `ddpm.edm` (its own notation: σ = √((1 - ᾱ)/ᾱ)); `SAMPLERS` names
them all, and the pieces they share (types, per-image noise) are in `ddpm.sampler_base`.

Notation (as in `ddpm.schedule`; a sampler of `steps` < T steps runs on the respaced chain
`schedule.respace(ts)`, whose entry i is training timestep ts[i]):

    code name                          paper symbol
    a_bar, a_bar_prev                  ᾱ_τi, ᾱ_τ(i-1)          (ᾱ before the first step := 1)
    alpha, sigma                       α = √ᾱ, σ = √(1 - ᾱ)    (DPM-Solver's notation)
    lam                                λ = log(α / σ), half the log-SNR
    x0, eps                            the model's x̂_0 and ε̂ at x_t
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ddpm.abm import sample_abm
from ddpm.edm import sample_edm
from ddpm.grids import timesteps
from ddpm.sampler_base import (
    Callback,
    Denoiser,
    Generator,
    check_final,
    predict,
    randn,
    to_sigma_zero,
    x0_and_eps,
)
from ddpm.schedule import NoiseSchedule

MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed_everything's range is [0, 2^32 - 1]


def check_seed(seed: Any, key: str = "seed") -> None:
    """A seed that is an integer in [0, 2^32 - 1]: Lightning refuses others without the key,
    and `image_generators` keeps 32 bits, so seed s + 2^32 (or -1 = 2^32 - 1) would silently
    draw the images of another seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{key} must be an integer, e.g. {key}=0; got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(
            f"{key}={seed} is out of range: give an integer in [0, {MAX_SEED}] (2^32 - 1, "
            f"numpy's and Lightning's range), e.g. {key}=0"
        )


def image_generators(seed: int, first: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image: image k of `seed` draws from its own stream (as EDM does).

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so (seed, k) is
    mapped to seed * 2654435761 + k mod 2^32: distinct for every k of one seed, and the
    streams of two seeds meet only ~10^9 images apart.
    """
    return [
        torch.Generator().manual_seed((seed * 2654435761 + k) % 2**32)
        for k in range(first, first + count)
    ]


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int | None = None,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    variance: str = "large",
    clip_x0: bool = True,
) -> Tensor:
    """DDPM ancestral sampling, Ho et al. 2020 Algorithm 2 (eqs. 6-7, 11), respaced when steps < T.

    `variance="large"` uses σ_t² = β_t, `"small"` the posterior variance β̃_t, `"learned"` the
    model's exp(frac log β_t + (1 - frac) log β̃_t), frac = (v + 1)/2 (Nichol & Dhariwal 2021,
    eq. 15, on the respaced β and β̃), `"auto"` learned when the model gives v, else small.
    With steps < T the chain runs on a subsequence τ of timesteps with β_τi = 1 - ᾱ_τi /
    ᾱ_τ(i-1) (Nichol & Dhariwal 2021, Sec. 4), which with all T steps is the training chain.
    """
    if variance not in ("large", "small", "learned", "auto"):
        raise ValueError(
            f"DDPM variance must be 'large', 'small', 'learned' or 'auto', got {variance!r}"
        )
    T = schedule.num_timesteps
    ts = timesteps(T, steps or T)
    chain = schedule.respace(ts)
    # Python floats: the loop multiplies tensors of any dtype by them without a cast
    sigma = (chain.betas if variance == "large" else chain.posterior_variance).sqrt().tolist()
    log_betas = chain.betas.log().tolist()
    log_small = chain.posterior_log_variance_clipped.tolist()
    coef_x0 = chain.posterior_mean_coef1.tolist()  # eq. 7, weight of x_0 in μ̃
    coef_xt = chain.posterior_mean_coef2.tolist()  # eq. 7, weight of x_t
    sqrt_recip = chain.sqrt_recip_alphas_cumprod.tolist()
    sqrt_recipm1 = chain.sqrt_recipm1_alphas_cumprod.tolist()

    x = x_T
    for i, idx in enumerate(reversed(range(len(ts)))):
        t = torch.full((x.shape[0],), int(ts[idx]), device=x.device, dtype=torch.long)
        eps, v = predict(denoiser, x, t)
        if variance == "learned" and v is None:
            raise ValueError(
                "variance='learned' needs a model trained with module.learn_sigma=true"
            )
        learned = v is not None and variance in ("learned", "auto")
        x0 = sqrt_recip[idx] * x - sqrt_recipm1[idx] * eps  # eq. 15
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        x = coef_x0[idx] * x0 + coef_xt[idx] * x  # the posterior mean μ̃ (eq. 7)
        if idx > 0:  # no noise is added at the last step (Algorithm 2, line 3: z = 0 if t = 1)
            if learned:
                frac = (v.to(x.dtype) + 1) / 2
                std = torch.exp(0.5 * (frac * log_betas[idx] + (1 - frac) * log_small[idx]))
            else:
                std = sigma[idx]
            x = x + std * randn(x.shape, generator, x.device).to(x.dtype)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int | None = 50,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    eta: float = 0.0,
    spacing: str = "uniform",
    clip_x0: bool = True,
) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12; η = 0 is deterministic, η = 1 with all T steps is DDPM
    with the posterior variance. `spacing` uniform or quadratic (their CIFAR-10 choice)."""
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    ts = timesteps(
        schedule.num_timesteps, steps or schedule.num_timesteps, spacing, schedule.alphas_cumprod
    )
    chain = schedule.respace(ts)
    a_bars, a_bars_prev = chain.alphas_cumprod.tolist(), chain.alphas_cumprod_prev.tolist()
    x = x_T
    for i, idx in enumerate(reversed(range(len(ts)))):
        t = torch.full((x.shape[0],), int(ts[idx]), device=x.device, dtype=torch.long)
        a_bar, a_bar_prev = a_bars[idx], a_bars_prev[idx]
        x0, eps = x0_and_eps(denoiser, x, t, a_bar, clip_x0)
        # eq. 16: σ_t(η) = η √((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) √(1 - ᾱ_t / ᾱ_{t-1})
        sigma = eta * ((1 - a_bar_prev) / (1 - a_bar) * (1 - a_bar / a_bar_prev)) ** 0.5
        # eq. 12: predicted x_0, direction pointing to x_t, random noise
        x = a_bar_prev**0.5 * x0 + max(1 - a_bar_prev - sigma**2, 0.0) ** 0.5 * eps
        if idx > 0 and sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device).to(x.dtype)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _dpmpp_step(x: Tensor, x0s: list[Tensor], hs: list[float], h: float, k: int, chain_step):
    """One DPM-Solver++ step of order k from x_t to the next, less noisy x_s (Lu et al. 2022):
    x_s = (σ_s/σ_t) x_t - α_s (e^-h - 1) D, D = x̂_0 plus the λ-derivatives of x̂_0 that the last
    k data predictions `x0s` (newest last, λ gaps `hs` between them) give by divided
    differences. `chain_step` = (σ_s/σ_t, α_s)."""
    sigma_ratio, alpha_next = chain_step
    e = math.expm1(-h)  # e^-h - 1
    x0 = x0s[-1]
    if k == 1:  # DDIM
        return sigma_ratio * x - alpha_next * e * x0
    if k == 2:  # Algorithm 2: D = (1 + 1/2r) x̂_0(t) - 1/2r x̂_0(previous), r = h_prev / h
        r = hs[-1] / h
        return sigma_ratio * x - alpha_next * e * ((1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0s[-2])
    # 3M, as the authors' code (multistep_dpm_solver_third_order_update) and diffusers run it:
    # D1 ≈ h·dx̂_0/dλ, D2 ≈ h²/2·d²x̂_0/dλ² from three predictions, with the weights
    # φ_2 = (e^-h - 1)/h + 1 and φ_3 = (e^-h - 1 + h)/h² - 1/2 of the exponential integrator
    r0, r1 = hs[-1] / h, hs[-2] / h
    d1_0, d1_1 = (x0 - x0s[-2]) / r0, (x0s[-2] - x0s[-3]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return (
        sigma_ratio * x
        - alpha_next * e * x0
        + alpha_next * (e / h + 1) * d1
        - alpha_next * ((e + h) / h**2 - 0.5) * d2
    )


def _dpmpp_multistep(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int,
    order: int,
    callback: Callback | None,
    spacing: str,
    clip_x0: bool,
    final: str = "x0",
) -> Tensor:
    """DPM-Solver++(2M) or (3M) on `steps` timesteps: each step at the highest order its
    history allows, and at most order j over the last j steps (the reference code's
    lower_order_final: the step into t = 0 at first order, i.e. DDIM, since its λ gap is
    wide and extrapolating x̂_0 over it overshoots). The sample is x̂_0 at t = 0 (`final="x0"`)
    or, `final="extrapolated"`, x̂_0 carried on to σ = 0 (see `to_sigma_zero`)."""
    check_final(final)
    ts = timesteps(schedule.num_timesteps, steps, spacing, schedule.alphas_cumprod)
    chain = schedule.respace(ts)
    a_bars, a_bars_prev = chain.alphas_cumprod.tolist(), chain.alphas_cumprod_prev.tolist()
    x, x0s, hs = x_T, [], []
    for i, idx in enumerate(reversed(range(len(ts)))):
        t = torch.full((x.shape[0],), int(ts[idx]), device=x.device, dtype=torch.long)
        a_bar = a_bars[idx]
        x0, _ = x0_and_eps(denoiser, x, t, a_bar, clip_x0)
        if idx == 0:  # to σ = 0: x is the data prediction itself
            x = x0
            if final == "extrapolated" and x0s:
                x = to_sigma_zero(x0, x0s[-1], a_bar, a_bars[1], clip_x0)
        else:
            a_bar_next = a_bars_prev[idx]  # the next state is one step less noisy
            alpha, sigma = a_bar**0.5, (1 - a_bar) ** 0.5
            alpha_next, sigma_next = a_bar_next**0.5, (1 - a_bar_next) ** 0.5
            h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)  # λ_s - λ_t
            x0s, k = [*x0s[-2:], x0], min(order, len(x0s) + 1, idx)
            x = _dpmpp_step(x, x0s, hs, h, k, (sigma_next / sigma, alpha_next))
            hs = [*hs[-1:], h]
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int | None = 20,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    spacing: str = "logsnr",
    clip_x0: bool = True,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: multistep 2nd order in the data prediction,
    with λ = log(α/σ); the first step and the last two go at first order (the step into t = 0
    and x̂_0 there). `spacing="logsnr"` (the default) takes steps uniform in λ, as Lu et al.
    recommend for multistep solvers: with uniform t the last λ gap barely shrinks with more
    steps and the error stalls at ~1e-3 from 100 steps on (tests/test_samplers.py, exact ODE).
    """
    steps = steps or schedule.num_timesteps
    return _dpmpp_multistep(denoiser, schedule, x_T, steps, 2, callback, spacing, clip_x0)


@torch.no_grad()
def sample_dpmpp_3m(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int | None = 20,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    spacing: str = "broad",
    clip_x0: bool = True,
    final: str = "extrapolated",
) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022's code): multistep 3rd order in the data prediction,
    first and second order over the first two steps and the last two. The defaults,
    `spacing="broad"` (`timesteps`) and `final="extrapolated"` (x̂_0 carried on to σ = 0 in
    σ², `to_sigma_zero`), are what make it pay: on the exact ODE of Gaussian data of std 0.3,
    0.6 and 1.0 it is at most diffusers' DPM++(2M) at 10-100 steps on the linear and cosine
    schedules (docs/samplers.md, bench/ode_error.py).
    """
    steps = steps or schedule.num_timesteps
    return _dpmpp_multistep(denoiser, schedule, x_T, steps, 3, callback, spacing, clip_x0, final)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "edm": sample_edm,
    "abm": sample_abm,
}


def sampler_settings(
    config: Mapping[str, Any] | None, steps: int | None = None, default: str = "ddpm"
) -> dict[str, Any]:
    """A sampler config group ({name, steps, options...}) -> the sampler setting that
    `ddpm.generate.generate` takes: {"sampler": name, "steps": steps, **options}. A `steps`
    given here wins over the config's."""
    settings = dict(config or {"name": default})
    settings["sampler"] = settings.pop("name")
    configured = settings.pop("steps", None)
    settings["steps"] = steps if steps is not None else configured
    # a misspelt option fails here, by name, not as a TypeError deep inside sampling
    fixed = {"denoiser", "schedule", "x_T", "steps", "generator", "callback"}
    known = set(inspect.signature(get_sampler(settings["sampler"])).parameters) - fixed
    unknown = set(settings) - known - {"sampler", "steps"}
    if unknown:
        raise ValueError(
            f"sampler option {sorted(unknown)[0]!r} is not one of {settings['sampler']}'s: "
            f"{sorted(known)}"
        )
    return settings


def check_steps(steps: Any, num_timesteps: int, key: str = "steps") -> None:
    """None (the sampler's default: all T for DDPM) or an integer in [1, T]: 0 would silently
    run all T steps (`steps or T`) while the records say 0."""
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"sampler steps must be in [1, {num_timesteps}] (the schedule's T), got {steps!r} "
            f"({key}={steps!r}); give {key}=N within them (e.g. sampler=ddim {key}=50), or "
            f"{key}=null for the default"
        )


def check_guidance(guidance: Any, key: str = "guidance") -> None:
    """Classifier-free guidance w: a finite number >= 0, or None (the default). nan makes every
    image black (and sample.json invalid JSON); a negative w is refused rather than given a
    meaning: ε = (1 + w) ε(x, y) - w ε(x, ∅) weakens the class for -1 < w < 0, is the
    unconditional model at w = -1 and steers away from the class below, none of which Ho &
    Salimans use."""
    if guidance is None:
        return
    number = not isinstance(guidance, bool) and isinstance(guidance, (int, float))
    if not number or not math.isfinite(guidance) or guidance < 0:
        raise ValueError(
            f"{key}={guidance!r}: classifier-free guidance w must be a finite number >= 0 (0: "
            "the conditional model alone, e.g. 2: a stronger class); a negative w would weaken "
            f"or reverse the class (-1: the unconditional model); give {key}=0 or more"
        )


def dry_run(
    settings: Mapping[str, Any], schedule: NoiseSchedule, learned_variance: bool = False
) -> None:
    """Runs the sampler of `settings` (`sampler_settings`' dict) once on a single pixel with a
    zero denoiser (with a zero variance output where the model learns one), so that a wrong
    option value (an ABM order, a spacing, DDIM's η < 0, a learned variance the model lacks)
    fails with the sampler's own one-line message before any image is drawn or any output
    written. The samplers check their options as they run; running them is the one check
    that cannot drift from theirs. Milliseconds (DDPM over T = 1000 steps of one pixel)."""
    options = {k: v for k, v in settings.items() if k not in ("sampler", "steps")}
    x = torch.zeros(1, 1, 1, 1, device=schedule.betas.device)

    def zero(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        return torch.zeros_like(x_t), torch.zeros_like(x_t) if learned_variance else None

    get_sampler(settings["sampler"])(zero, schedule, x, settings["steps"], **options)


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Look a sampler up by its config name, with an error listing the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None


def sampler_label(settings: Mapping[str, Any], num_timesteps: int) -> str:
    """The name a sampler setting is reported under in every metric: sampler and step count,
    e.g. ddim50, ddpm1000 (steps=None means all T steps)."""
    return f"{settings['sampler']}{settings.get('steps') or num_timesteps}"
