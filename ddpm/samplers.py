"""Samplers: plain functions with one signature.

    sample_xxx(model_fn, schedule, x_T, steps, *, generator=None, callback=None, ...) -> x_0

`model_fn(x_t, t) -> ε` (B, C, H, W) for (B,) int64 timesteps of the training chain.
`callback(i, t, x_t, x0_pred)` is called after every step (i counts steps from 0), for animations.
`generator` is a torch.Generator, or one per image (see `image_generators`) so that image k of a
seed is the same whatever batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm.schedule import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor, Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None


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


def timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> Tensor:
    """The increasing subsequence of training timesteps a `steps`-step sampler visits.

    `uniform` spreads them evenly over [0, T-1] (all of them when steps == T); `quadratic` packs
    them near t = 0, as Song et al. 2021 (DDIM) do for CIFAR-10.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"sampler steps must be in [1, {num_timesteps}] (the schedule's T), got {steps}"
        )
    if spacing == "uniform":
        ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round()
    elif spacing == "quadratic":
        ts = (
            torch.linspace(0, (num_timesteps - 1) ** 0.5, steps, dtype=torch.float64) ** 2
        ).round()
    else:
        raise ValueError(f"timestep spacing must be 'uniform' or 'quadratic', got {spacing!r}")
    ts = torch.unique(ts.long())
    if len(ts) != steps:
        raise ValueError(f"{spacing} spacing gives only {len(ts)} distinct steps for steps={steps}")
    return ts


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
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

    `variance="large"` uses σ_t² = β_t, `"small"` the posterior variance β̃_t. With steps < T
    the chain runs on a subsequence τ of timesteps with β_τi = 1 - ᾱ_τi / ᾱ_τ(i-1) (Nichol &
    Dhariwal 2021, Sec. 4), which with all T steps is exactly the training chain.
    """
    if variance not in ("large", "small"):
        raise ValueError(f"DDPM variance must be 'large' or 'small', got {variance!r}")
    T = schedule.num_timesteps
    ts = timesteps(T, steps or T)
    # Coefficients of the (respaced) chain, in float64 then cast once.
    a_bar = schedule.alphas_cumprod.double().cpu()[ts]
    a_bar_prev = torch.cat([a_bar.new_ones(1), a_bar[:-1]])
    betas = 1 - a_bar / a_bar_prev
    post_var = betas * (1 - a_bar_prev) / (1 - a_bar)
    sigma = (betas if variance == "large" else post_var).sqrt()
    coef_x0 = a_bar_prev.sqrt() * betas / (1 - a_bar)  # eq. 7, weight of x_0 in μ̃
    coef_xt = (1 - betas).sqrt() * (1 - a_bar_prev) / (1 - a_bar)  # eq. 7, weight of x_t
    sqrt_recip = (1 / a_bar).sqrt()
    sqrt_recipm1 = (1 / a_bar - 1).sqrt()

    # Python floats: the loop multiplies tensors of any dtype by them without a cast
    sigma, coef_x0, coef_xt, sqrt_recip, sqrt_recipm1 = (
        v.tolist() for v in (sigma, coef_x0, coef_xt, sqrt_recip, sqrt_recipm1)
    )

    x = x_T
    for i, idx in enumerate(reversed(range(len(ts)))):
        t = torch.full((x.shape[0],), int(ts[idx]), device=x.device, dtype=torch.long)
        eps = model_fn(x, t)
        x0 = sqrt_recip[idx] * x - sqrt_recipm1[idx] * eps  # eq. 15
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        x = coef_x0[idx] * x0 + coef_xt[idx] * x  # the posterior mean μ̃ (eq. 7)
        if idx > 0:  # no noise is added at the last step (Algorithm 2, line 3: z = 0 if t = 1)
            x = x + sigma[idx] * randn(x.shape, generator, x.device).to(x.dtype)
        if callback is not None:
            callback(i, t, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": sample_ddpm}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Look a sampler up by its config name, with an error listing the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
