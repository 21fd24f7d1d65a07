"""Timestep grids: which training timesteps a sampler of N steps visits.

`timesteps(T, steps, spacing, alphas_cumprod)` is shared by every sampler (`ddpm.samplers`,
`ddpm.abm`) and by progressive distillation (`ddpm.distill`), so it lives below all of them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

LOGSNR_FLOOR = -5.1  # λ at which `logsnr` spacing's even grid stops (see `timesteps`)
# `broad` spacing: even in arctan(e^(-w(λ - c))), density in λ ∝ sech(w(λ - c)); `angle` is
# c = 0, w = 1. Chosen on bench/ode_error.py (docs/samplers.md): c from {1, 1.5, 2}, w from
# {0.2, 0.3, 0.4, 0.5} on data std s ∈ {0.3, 0.6, 1.0}, checked on s ∈ {0.2, 0.45, 0.8, 1.5}
BROAD_CENTER, BROAD_WIDTH = 1.5, 0.4


def timesteps(
    num_timesteps: int,
    steps: int,
    spacing: str = "uniform",
    alphas_cumprod: Tensor | None = None,
) -> Tensor:
    """The increasing subsequence of training timesteps a `steps`-step sampler visits.

    `uniform` spreads them evenly over [0, T-1] (all of them when steps == T); `quadratic` packs
    them near t = 0, as Song et al. 2021 (DDIM) do for CIFAR-10; `logsnr` spaces them evenly in
    λ = log(α/σ) (needs the schedule's `alphas_cumprod`), DPM-Solver's choice for its multistep
    solvers (Lu et al. 2022, Sec. 3.3 / App. D): uniform t leaves one step near t = 0 whose λ
    gap shrinks only like ½·log(1 + T/steps), which caps a 2nd-order solver at 1st-order error.
    `angle` spaces them evenly in φ = arctan(σ/α) (needs `alphas_cumprod` too): dense in the
    middle of λ and sparse at both ends. `broad` is even in arctan(e^(-w(λ - c))), c = 1.5,
    w = 0.4: the angle grid centred at λ = 1.5 (where x̂_0 of data of std e^-1.5 ≈ 0.22 changes)
    and widened 2.5-fold, so that data of std 0.2-1.5 (x̂_0 changing at λ ≈ -log s) all get
    dense steps; DPM-Solver++(3M)'s default (docs/samplers.md).
    `trailing` counts back from T - 1 in strides of T/steps: the grid of N steps is every
    other point of 2N's (what progressive distillation halves, `ddpm.distill`).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"sampler steps must be in [1, {num_timesteps}] (the schedule's T), got {steps}"
        )
    if steps == 1:  # one step from pure noise: from t = T - 1 (spacing 0..T-1 would give t = 0)
        return torch.tensor([num_timesteps - 1])
    if spacing == "uniform":
        ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long()
    elif spacing == "quadratic":
        root_t = (num_timesteps - 1) ** 0.5
        ts = (torch.linspace(0, root_t, steps, dtype=torch.float64) ** 2).round().long()
    elif spacing == "trailing":
        # every (T/steps)-th step counted back from T - 1 (Lin et al. 2024, Table 2; diffusers'
        # timestep_spacing="trailing"): the last step starts at t = T/steps - 1, not at 0, and
        # the grid of N steps is every other point of the grid of 2N, which progressive
        # distillation needs (ddpm.distill). Integer rounding (half up) keeps that exact.
        i = torch.arange(1, steps + 1)
        ts = (2 * num_timesteps * i + steps) // (2 * steps) - 1
    elif spacing in ("logsnr", "angle", "broad"):
        if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
            raise ValueError(f"{spacing} spacing needs the schedule's alphas_cumprod")
        a_bar = alphas_cumprod.double().cpu()
        lam = (0.5 * torch.log(a_bar / (1 - a_bar))).numpy()  # decreasing in t
        if spacing == "logsnr":
            # below λ ≈ -5 (ᾱ < 5e-5, where the linear schedule of Ho et al. ends) x_t is
            # noise to within 1 %: the cosine and sigmoid schedules reach λ ≈ -10 in their last
            # few steps, and an even λ grid to there would spend a third of its steps on them.
            # The first step still starts at t = T - 1.
            grid = np.linspace(lam[0], max(lam[-1], LOGSNR_FLOOR), steps)
        else:
            # φ = arctan(σ/α) = arctan(e^-λ), the angle of (α, σ) on the unit circle (Salimans
            # & Ho 2022's φ): even in φ is even in t on the cosine schedule, on any schedule;
            # `broad` takes φ of w(λ - c) instead of λ
            c, w = (BROAD_CENTER, BROAD_WIDTH) if spacing == "broad" else (0.0, 1.0)
            ends = np.arctan(np.exp(-w * (lam[[0, -1]] - c)))
            grid = c - np.log(np.tan(np.linspace(ends[0], ends[1], steps))) / w
        # the (fractional) t where λ(t) meets each grid point, rounded: np.interp wants
        # increasing x, so λ is read backwards
        t_of_lam = np.interp(grid[::-1], lam[::-1], np.arange(num_timesteps)[::-1])[::-1]
        ts = torch.from_numpy(np.round(t_of_lam).copy()).long()
        ts[-1] = num_timesteps - 1
    else:
        raise ValueError(
            f"sampler.spacing={spacing!r}: the timestep spacing is 'uniform', 'quadratic', "
            "'logsnr', 'angle', 'broad' or 'trailing'; give e.g. sampler.spacing=logsnr"
        )
    if spacing in ("quadratic", "logsnr", "angle", "broad"):
        # near t = 0 several grid points round onto one step: move each repeat one step up,
        # then (at steps close to T) each overflow one step down below its successor
        for i in range(1, steps):
            ts[i] = max(int(ts[i]), int(ts[i - 1]) + 1)
        ts[-1] = min(int(ts[-1]), num_timesteps - 1)
        for i in reversed(range(steps - 1)):
            ts[i] = min(int(ts[i]), int(ts[i + 1]) - 1)
    ts = torch.unique(ts)
    if len(ts) != steps or ts[0] < 0 or ts[-1] > num_timesteps - 1:
        raise ValueError(f"{spacing} spacing gives only {len(ts)} distinct steps for steps={steps}")
    return ts
