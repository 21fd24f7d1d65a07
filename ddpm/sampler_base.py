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
