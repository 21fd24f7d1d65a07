"""The EDM sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models") for this project's VP models, as k-diffusion's `sample_heun` runs them.

Notation (Karras et al. 2022, Table 1, VP column; ᾱ as in `ddpm.schedule`):

    code name     paper symbol
    sigma         σ = √((1 - ᾱ_t) / ᾱ_t): x_t = √ᾱ_t · x_σ, x_σ = x_0 + σ n (n ~ N(0, I))
    x             x_σ; the network sees x_t = x_σ / √(1 + σ²) (c_in = 1/√(σ² + 1))
    x0            D(x_σ; σ) = x_σ - σ ε̂(x_t, t) (c_skip = 1, c_out = -σ)
    d             dx/dσ = (x - D(x; σ)) / σ, the probability-flow ODE (eq. 3 with σ(t) = t)
    gamma         γ_i of the churn: σ̂_i = σ_i (1 + γ_i) (Algorithm 2)

The network takes integer training timesteps, and this sampler asks it about no other: the
Karras grid is snapped to the σ of the nearest training t (in log σ), and every step uses the
σ of the t the network was evaluated at, so no σ is silently quantised (k-diffusion's
`quantize=True` evaluates the nearest t but scales by the unsnapped σ). What snapping costs on
the exact ODE, against a continuous σ grid: docs/samplers.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ddpm.sampler_base import Callback, Denoiser, Generator, predict, randn
from ddpm.schedule import NoiseSchedule

Denoise = Callable[[Tensor, float], Tensor]  # D(x_σ; σ) -> x̂_0, for `heun`


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """The `steps` noise levels of eq. 5, σ_max down to σ_min, even in σ^(1/ρ) (σ_N = 0 is not
    among them)."""
    if steps == 1:
        return [sigma_max]
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)]


def vp_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """σ_t = √((1 - ᾱ_t) / ᾱ_t) of every training timestep (T,), float64, increasing in t."""
    a_bar = schedule.alphas_cumprod64.numpy()  # float64, what `respace` builds chains from
    return np.sqrt((1 - a_bar) / a_bar)


def snap(sigmas: Sequence[float], train_sigmas: np.ndarray) -> list[int]:
    """The distinct training timesteps whose σ are nearest (in log σ) to a decreasing grid,
    from T - 1 down to 0: where several round onto one step (near σ_min, or at steps close
    to T) they are spread onto its neighbours, as `timesteps` does."""
    T = len(train_sigmas)
    t = np.interp(np.log(sigmas), np.log(train_sigmas), np.arange(T)).round().astype(int)
    t[0] = T - 1
    for i in range(1, len(t)):
        t[i] = min(t[i], t[i - 1] - 1)
    t[-1] = 0 if len(t) > 1 else T - 1  # one step goes from x_T's own σ
    for i in reversed(range(len(t) - 1)):
        t[i] = max(t[i], t[i + 1] + 1)
    return t.tolist()


@torch.no_grad()
def heun(
    denoise: Denoise,
    sigmas: Sequence[float],
    x: Tensor,
    *,
    churn: tuple[float, float, float, float] = (0.0, 0.0, math.inf, 1.0),
    noise: Callable[[], Tensor] | None = None,
    level: Callable[[float, float], float] = lambda sigma, wanted: wanted,
    callback: Callable[[int, float, Tensor, Tensor], None] | None = None,
    euler_first: bool = False,
) -> Tensor:
    """Karras et al. 2022 Algorithm 2 on the decreasing noise levels `sigmas` (then σ_N = 0),
    from x_σ0 (B, C, H, W): Heun's 2nd order, Euler for the last step into σ = 0. churn =
    (S_churn, S_tmin, S_tmax, S_noise); `noise()` draws the churn's n ~ N(0, I);
    `level(σ_i, σ̂)` the noise level actually used for σ̂ (a training σ ≥ σ_i when snapped);
    `callback(i, σ̂_i, x_{i+1}, D(x̂_i; σ̂_i))`; `euler_first`: the first step at first order
    too. Network calls: 2 per step, 1 for each Euler step."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    steps = len(sigmas)
    sigmas = [*sigmas, 0.0]
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Alg. 2 lines 4-6: raise the noise to σ̂ = σ_i (1 + γ_i), γ_i = min(S_churn/N, √2 - 1)
        gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = level(sigma, sigma * (1 + gamma)) if gamma > 0 else sigma
        if sigma_hat > sigma:
            x = x + (sigma_hat**2 - sigma**2) ** 0.5 * s_noise * noise()
        x0 = denoise(x, sigma_hat)
        d = (x - x0) / sigma_hat  # line 7: dx/dσ at σ̂
        x_next = x + (sigma_next - sigma_hat) * d  # line 8: Euler step
        if sigma_next > 0 and not (euler_first and i == 0):  # lines 9-11: 2nd order correction
            d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback(i, sigma_hat, x, x0)
    return x


@torch.no_grad()
def sample_edm(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int | None = 18,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    rho: float = 7.0,
    sigma_max: float | None = 80.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
    clip_x0: bool = False,
) -> Tensor:
    """EDM's sampler (Karras et al. 2022, Algorithms 1-2) on a VP model: `steps` noise levels
    even in σ^(1/ρ) (eq. 5) down to the schedule's σ_min (t = 0), snapped to training
    timesteps; Heun's 2nd order, Euler into σ = 0.

    x_T is the state at σ_T (t = T - 1). With `sigma_max` (EDM's 80) below σ_T, σ_T is the
    first level, the Karras grid from sigma_max the other steps - 1, and the step from σ_T an
    Euler step (i.e. DDIM): the trapezoidal rule would average the slope at σ_T with the one at
    sigma_max, and only the latter sees the data (σ_T ≈ 2e4 on the cosine schedule). None
    starts the grid at σ_T (k-diffusion's choice for VP models). Network calls per image:
    2·steps - 2, or 2·steps - 1 with the grid from σ_T.

    s_churn > 0 adds noise γ_i (from the per-image `generator`) for σ in [s_tmin, s_tmax]
    (Alg. 2; s_tmax None: no bound; s_churn 0: deterministic, Alg. 1). x̂_0 is clipped to
    [-1, 1] only with `clip_x0` (EDM and k-diffusion do not clip)."""
    T = schedule.num_timesteps
    steps = steps or T
    if not 1 <= steps <= T:
        raise ValueError(f"sampler steps must be in [1, {T}] (the schedule's T), got {steps}")
    if rho <= 0 or s_churn < 0 or s_noise < 0 or (sigma_max is not None and sigma_max <= 0):
        raise ValueError(
            f"EDM needs rho > 0, sigma_max > 0 or null, s_churn >= 0 and s_noise >= 0 (Karras "
            f"et al.: rho=7, sigma_max=80, s_churn=0 for the deterministic sampler), got "
            f"rho={rho}, sigma_max={sigma_max}, s_churn={s_churn}, s_noise={s_noise}"
        )
    train = vp_sigmas(schedule)
    capped = not (sigma_max is None or sigma_max >= train[-1] or steps == 1)
    if not capped:
        grid = karras_sigmas(train[0], train[-1], steps, rho)
    else:
        grid = [train[-1], *karras_sigmas(train[0], max(sigma_max, train[0]), steps - 1, rho)]
    ts = snap(grid, train)
    t_of = {float(train[t]): t for t in range(T)}  # σ -> its timestep, exact floats

    def level(sigma: float, wanted: float) -> float:
        """The training σ nearest to σ̂ in log σ, never below σ_i."""
        t = int(np.interp(math.log(wanted), np.log(train), np.arange(T)).round())
        return float(max(train[min(t, T - 1)], sigma))

    def t_batch(sigma: float) -> Tensor:
        return torch.full((x_T.shape[0],), t_of[sigma], device=x_T.device, dtype=torch.long)

    def denoise(x: Tensor, sigma: float) -> Tensor:
        eps, _ = predict(denoiser, x / (1 + sigma**2) ** 0.5, t_batch(sigma))
        x0 = x - sigma * eps
        return x0.clamp(-1, 1) if clip_x0 else x0

    def report(i: int, sigma: float, x: Tensor, x0: Tensor) -> None:
        sigma_next = float(train[ts[i + 1]]) if i + 1 < len(ts) else 0.0
        callback(i, t_batch(sigma), x / (1 + sigma_next**2) ** 0.5, x0)

    sigmas = [float(train[t]) for t in ts]
    return heun(
        denoise,
        sigmas,
        x_T * (1 + sigmas[0] ** 2) ** 0.5,  # x_T is the VP state at t = T - 1
        churn=(s_churn, s_tmin, math.inf if s_tmax is None else s_tmax, s_noise),
        noise=lambda: randn(x_T.shape, generator, x_T.device).to(x_T.dtype),
        level=level,
        callback=report if callback is not None else None,
        euler_first=capped,
    )
