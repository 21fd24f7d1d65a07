"""What every sampler shares: the denoiser and callback types, per-image noise, and the one
call of a denoiser (`ddpm.samplers` holds the samplers and their registry, `ddpm.edm` the EDM
sampler; both import this, so neither imports the other's module for it).

    denoiser(x_t, t) -> (ε, v)       (B, C, H, W) noisy images and (B,) int64 training
                                     timesteps -> ε̂ (B, C, H, W), v (B, C, H, W) or None
    callback(i, t, x_t, x0_pred)     after every step i (from 0), for animations
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# written out, not imported from ddpm.objectives: the math imports nothing but the schedule
Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]
Callback = Callable[[int, Tensor, Tensor, Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generator, device: torch.device | str) -> Tensor:
    """Standard normal noise of `shape`, drawn per image when given a list of generators."""
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} images")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generator]).to(
            device
        )
    if generator is not None and generator.device != torch.device(device):
        return torch.randn(tuple(shape), generator=generator).to(device)
    return torch.randn(tuple(shape), generator=generator, device=device)


def predict(denoiser: Denoiser, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
    """(ε, v) of the denoiser at x_t; refuses a bare ε, which unpacking would split along the
    batch without a word."""
    out = denoiser(x, t)
    if not isinstance(out, tuple):
        raise TypeError(
            f"a denoiser returns (ε, v or None), e.g. ddpm.objectives.Prediction(eps); got a "
            f"{type(out).__name__}"
        )
    return out


def x0_and_eps(denoiser: Denoiser, x: Tensor, t: Tensor, a_bar: float, clip_x0: bool):
    """The model's ε, its x_0 = (x_t - √(1-ᾱ) ε) / √ᾱ (eq. 15), clipped, and the ε that fits it.

    Written out here, not `schedule.predict_x0`: ᾱ is the respaced chain's Python float."""
    eps, _ = predict(denoiser, x, t)
    x0 = (x - (1 - a_bar) ** 0.5 * eps) / a_bar**0.5
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - a_bar**0.5 * x0) / (1 - a_bar) ** 0.5
    return x0, eps


def check_final(final: str) -> None:
    """The last step to σ = 0 of the multistep samplers: 'x0' or 'extrapolated'."""
    if final not in ("x0", "extrapolated"):
        raise ValueError(
            f"sampler.final={final!r}: the last step to σ = 0 is 'x0' (x̂_0 at t = 0) or "
            "'extrapolated' (x̂_0 extrapolated in σ² from the last two steps)"
        )


def to_sigma_zero(x0: Tensor, x0_prev: Tensor, a_bar: float, a_bar_prev: float, clip: bool):
    """x̂_0 at t = 0 (σ_0² = (1 - ᾱ_0)/ᾱ_0 in EDM's σ) extrapolated to σ = 0 along the ODE.

    With EDM's σ the ODE is dx/dσ = (x - D)/σ and D = x + σ² ∇log p_σ(x), so along a path
    dx/dσ = -σ ∇log p_σ → 0 at σ = 0 and D(σ) = D(0) + c σ² + O(σ⁴): Richardson's step in σ²
    from x̂_0 at t = 0 and at the step before (σ_1) gives D(0) to O(σ_0² σ_1²) instead of
    O(σ_0²), no extra network call. Its weight on the older x̂_0 is σ_0²/(σ_1² - σ_0²) < 0.1
    on every grid here, so network noise in x̂_0 is not amplified."""
    s0, s1 = (1 - a_bar) / a_bar, (1 - a_bar_prev) / a_bar_prev
    x = x0 - s0 / (s1 - s0) * (x0_prev - x0)
    return x.clamp(-1, 1) if clip else x
