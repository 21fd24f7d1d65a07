"""The variational bound of Ho et al. 2020 (eq. 5) in bits per dimension, and the reverse
process variance it is measured with (fixed β or β̃, or learned as in Nichol & Dhariwal 2021).

    L = L_T + Σ_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) ‖ N(0, I))                               the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t))           Gaussians: closed form
    L_0     = -log p_θ(x_0 | x_1), a Gaussian discretised to the 256 pixel levels (eq. 13)

Each term is averaged over the dimensions and divided by log 2, so the sum is bits/dim, the
unit of DDPM's Table 2 and iDDPM's Table 2. `bpd_exact` sums all T terms; `bpd_estimate`
(val/bpd) draws one t_i per image i from p(t) ∝ 1/t on 1..T-1:

    L̂_i = L_0(x_i) + L_T(x_i) + L_{t_i}(x_i) / p(t_i),    E[L̂_i] = L(x_i) for every image i

Timesteps are 0-based as in `ddpm.schedule`: index t holds the term of the paper's step t+1, so
index 0 is L_0 (and t_i above indexes the terms L_1..L_{T-1} between it and L_T).

Hand-written: no library (diffusers, torchmetrics) computes a diffusion model's bound. The
Gaussian CDF is the tanh approximation Ho et al.'s and improved-diffusion's code use, so that
figures compare with theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ddpm.schedule import NoiseSchedule, _extract

VARIANCES = ("large", "small", "learned")
LOG2 = math.log(2.0)

# denoiser(x_t, t) -> (ε̂, v), a `ddpm.objectives.Prediction`: v in [-1, 1] interpolates
# log β̃ .. log β (learned variances) or is None (fixed). Written out, not imported: the math
# imports nothing of the package but the schedule.
Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        - 1.0
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), as in Ho et al.'s code."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element for x on the 256 levels of [-1, 1] under N(mean, e^(2 log_scale))
    integrated over the level's bin of width 2/255; the end bins reach to ±∞ (eq. 13)."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_minus = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_mid = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_mid)
    )


def reverse_log_variance(
    schedule: NoiseSchedule, t: Tensor, ndim: int, variance: str, v: Tensor | None = None
) -> Tensor:
    """log σ_t² of p_θ(x_{t-1} | x_t), broadcastable to an ndim tensor.

    large: β_t, except β̃ at the first step (β_1 would make L_0 a far wider decoder than the
    chain ends with; Ho et al.'s `fixedlarge`); small: β̃_t (clipped at the first step);
    learned: exp(frac · log β_t + (1 - frac) · log β̃_t) with frac = (v + 1) / 2 (iDDPM eq. 15).
    """
    log_small = _extract(schedule.posterior_log_variance_clipped, t, ndim)
    if variance == "small":
        return log_small
    log_betas = torch.log(schedule.betas)
    if variance == "large":
        first_small = torch.cat([schedule.posterior_log_variance_clipped[:1], log_betas[1:]])
        return _extract(first_small, t, ndim)
    if variance == "learned":
        if v is None:
            raise ValueError("learned variances need the network's variance output v")
        frac = (v + 1) / 2
        return frac * _extract(log_betas, t, ndim) + (1 - frac) * log_small
    raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")


def prior_bpd(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T per image (B,), bits/dim: how far q(x_T | x_0) is from the N(0, I) sampling starts at."""
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean = _extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
    logvar = torch.log(_extract(1.0 - schedule.alphas_cumprod, t, x0.ndim)).expand_as(x0)
    kl = normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.flatten(1).mean(1) / LOG2


def vb_term_bpd(
    schedule: NoiseSchedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    eps: Tensor,
    log_variance: Tensor,
    clip_x0: bool = True,
) -> Tensor:
    """The term of timestep t per image (B,), bits/dim: L_0 where t = 0, else the KL between the
    true posterior and p_θ(x_{t-1} | x_t) = N(μ̃(x_t, x̂_0), σ_t²) with x̂_0 from the model's ε̂."""
    x0_hat = schedule.predict_x0(x_t, t, eps)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    true_mean, _, true_logvar = schedule.posterior(x0, x_t, t)
    model_mean, _, _ = schedule.posterior(x0_hat, x_t, t)
    log_variance = log_variance.expand_as(x0)
    kl = normal_kl(true_mean, true_logvar.expand_as(x0), model_mean, log_variance)
    kl = kl.flatten(1).mean(1) / LOG2
    first = t == 0
    if not bool(first.any()):
        return kl
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_variance)
    return torch.where(first, decoder_nll.flatten(1).mean(1) / LOG2, kl)


def learned_vb_term_bpd(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, v: Tensor
) -> Tensor:
    """The term of timestep t per image (B,), bits/dim, in float32, under the learned variance
    v and with x̂_0 unclipped: T times it at a random t estimates the L_vlb of L_hybrid
    (Nichol & Dhariwal 2021, Sec. 3.1), with the mean's gradient stopped when ε̂ is detached."""
    logvar = reverse_log_variance(schedule, t, x0.ndim, "learned", v.float())
    return vb_term_bpd(schedule, x0.float(), x_t.float(), t, eps, logvar, clip_x0=False)


def float64(schedule: NoiseSchedule, device: torch.device | str) -> NoiseSchedule:
    """The schedule's tables in float64 on `device` (a new module: the model's own stays as
    it is). The bound sums up to thousands of terms, some ~1e-6 bits: float32 tables would
    put their rounding into the figure. Built from the schedule's float64 β and ᾱ, not its
    float32 buffers, so a respaced chain's exact ᾱ carries over too."""
    return NoiseSchedule(
        schedule.betas64, schedule.name, torch.float64, alphas_cumprod=schedule.alphas_cumprod64
    ).to(device)


def _term(
    denoiser: Denoiser,
    precise: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    variance: str,
    clip_x0: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """L_t per image (B,) with the model called once, on x_t in the data's dtype; the noise
    is drawn from `generator` on its device (a CPU generator: the same draws on any device)."""
    noise = torch.randn(x0.shape, generator=generator, device=_device(generator)).to(x0)
    x_t = precise.q_sample(x0.double(), t, noise.double())
    x0 = x0.double()
    eps, v = denoiser(x_t.to(noise.dtype), t)
    v = None if v is None else v.double()
    logvar = reverse_log_variance(precise, t, x0.ndim, variance, v)
    return vb_term_bpd(precise, x0, x_t, t, eps.double(), logvar, clip_x0)


@torch.no_grad()
def bpd_exact(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    variance: str,
    *,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Tensor]:
    """The whole bound per image, every one of the T terms evaluated (T network calls per
    batch), as Ho et al.'s and improved-diffusion's `calc_bpd_loop`. Returns per-image (B,)
    `bpd` (the total), `prior`, `decoder` (L_0) and `terms` (B, T). `progress(1)` after each t."""
    precise = float64(schedule, x0.device)
    terms = []
    for t in range(schedule.num_timesteps):
        ts = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        terms.append(_term(denoiser, precise, x0, ts, variance, clip_x0, generator))
        if progress is not None:
            progress(1)
    terms = torch.stack(terms, 1)
    prior = prior_bpd(precise, x0.double())
    return {"bpd": terms.sum(1) + prior, "prior": prior, "decoder": terms[:, 0], "terms": terms}


def importance_timesteps(
    batch: int, T: int, generator: torch.Generator | None = None, stratified: bool = True
) -> tuple[Tensor, Tensor]:
    """One t per image from p(t) ∝ 1/t on 1..T-1 (the terms fall roughly that fast with t) by
    its inverse CDF: (t (batch,) int64, p(t) (batch,) float64), on the CPU. Every image's t has
    the marginal p(t) whatever its place in the batch, so L_t / p(t) is unbiased for each
    image's own Σ_t L_t. `stratified`: the uniforms are (π_i + U_i) / B with π a random
    permutation of the B strata, so the batch covers p(t) evenly (a lower variance of the batch
    mean: bench/bpd_estimator.py) while image i's stratum is uniform over all B; else
    independent U_i. Drawn from `generator` on its device: reproducible from its seed."""
    device = _device(generator)
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    if stratified:
        perm = torch.randperm(batch, generator=generator, device=device)
        u = (perm.to(torch.float64) + u) / batch
    weights = 1.0 / torch.arange(1, T, dtype=torch.float64)
    p = weights / weights.sum()
    cdf = torch.cumsum(p, 0)
    index = torch.searchsorted(cdf, u.cpu().clamp(max=1 - 1e-12)).clamp(max=T - 2)
    return index + 1, p[index]


@torch.no_grad()
def bpd_estimate(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    variance: str,
    *,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    stratified: bool = True,
) -> Tensor:
    """An estimate of the bound per image (B,) from two network calls per image, unbiased for
    each image's own bound (`bpd_exact`): L_0 and L_T exactly, and Σ_{t=1}^{T-1} L_t by one
    t per image drawn from p(t) ∝ 1/t and weighted by 1/p(t) (`importance_timesteps`; with
    `stratified` the batch's draws are spread over B strata, randomly assigned to images).
    Cheap enough for every validation; `bpd_exact` is the figure to report."""
    B, T = x0.shape[0], schedule.num_timesteps
    precise = float64(schedule, x0.device)
    prior = prior_bpd(precise, x0.double())
    zeros = torch.zeros(B, device=x0.device, dtype=torch.long)
    decoder = _term(denoiser, precise, x0, zeros, variance, clip_x0, generator)
    if T == 1:
        return decoder + prior
    t, p_t = importance_timesteps(B, T, generator, stratified)
    t, p_t = t.to(x0.device), p_t.to(x0.device)
    middle = _term(denoiser, precise, x0, t, variance, clip_x0, generator) / p_t
    return decoder + middle + prior


def _device(generator: torch.Generator | None) -> torch.device:
    """Where `generator` draws (validation seeds one on the batch's device); the CPU if None."""
    return torch.device("cpu") if generator is None else generator.device
