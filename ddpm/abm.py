"""ABM: an Adams-Bashforth-Moulton multistep in the angle φ = arctan(σ/α), whose corrector
costs no network call (predict, evaluate, correct).

    sample_abm(denoiser, schedule, x_T, steps=20, *, order=4, spacing="angle", final=...)

On the VP path α = cos φ, σ = sin φ, and the probability-flow ODE in the data prediction is

    d(x/σ)/dφ = -x̂_0(φ) / sin²φ,

so a step from φ_t down to φ_s is x_s = σ_s (x_t/σ_t + ∫_{φ_s}^{φ_t} x̂_0(φ)/sin²φ dφ), exact
in its linear part like DPM-Solver++; only x̂_0(φ) is approximated, by the polynomial in φ
through the last predictions. For data with a density x̂_0 along a path is analytic in φ on the
whole of [0, π/2]; in DPM-Solver's λ = log(α/σ) it is not at either end (it goes like e^λ at
the noisy end), which is why DPM-Solver++ lowers its order at the ends and why its error
changes sign from one range of λ to the next (docs/samplers.md). Each step:

    # Predictor (Adams-Bashforth): x̂_0 extrapolated through the last `order` predictions.
    # Evaluate: x̂_0 at the predicted state, the step's one network call.
    # Corrector (Adams-Moulton): the same step redone with the polynomial through those
    #   `order` predictions and the new one: order + 1 at no extra call.

The new prediction is the one the next step needs anyway and is kept as evaluated at the
predicted state, not re-evaluated at the corrected one (PEC mode, as UniPC's corrector, Zhao et
al. 2023, runs in λ). Hand-written: diffusers' and k-diffusion's multistep solvers all
interpolate in λ or σ; none steps in φ.

On the exact ODE of Gaussian data (bench/ode_error.py) order 4 on `angle` steps is below
diffusers' DPM++(2M) at 10-100 steps on the linear and cosine schedules and falls at every
step count (docs/samplers.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ddpm.grids import timesteps
from ddpm.sampler_base import (
    Callback,
    Denoiser,
    Generator,
    check_final,
    to_sigma_zero,
    x0_and_eps,
)
from ddpm.schedule import NoiseSchedule

MAX_ORDER = 4  # the predictor's; the corrector's is one more
# Gauss-Legendre in u = log φ: 1/sin²φ ≈ 1/φ² near the clean end is smooth in u, and the
# integrands are polynomials of degree < 5 in φ = e^u times it; 32 nodes give the weights to
# rounding (tests/test_abm.py compares them with 400 nodes)
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(32)


def angle_weights(nodes: Sequence[float], low: float, high: float) -> list[float]:
    """w_j = ∫_low^high L_j(φ) / sin²φ dφ for the Lagrange basis L_j of the angles `nodes`
    (0 < low < high ≤ π/2): the step's weight on the prediction made at nodes[j]."""
    a, b = math.log(low), math.log(high)
    phi = np.exp(0.5 * (b - a) * _NODES + 0.5 * (a + b))
    dphi = 0.5 * (b - a) * _WEIGHTS * phi / np.sin(phi) ** 2
    weights = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(phi)
        for m, other in enumerate(nodes):
            if m != j:
                basis *= (phi - other) / (node - other)
        weights.append(float((dphi * basis).sum()))
    return weights


def _step(x: Tensor, a_bar: float, a_bar_next: float, history: list[tuple[float, Tensor]]):
    """x_s = σ_s (x_t/σ_t + Σ_j w_j x̂_0,j): the exact step with x̂_0 the polynomial through
    `history` ((φ, x̂_0) pairs)."""
    phi, phi_next = _angle(a_bar), _angle(a_bar_next)
    weights = angle_weights([p for p, _ in history], phi_next, phi)
    sigma, sigma_next = (1 - a_bar) ** 0.5, (1 - a_bar_next) ** 0.5
    return sigma_next * (
        x / sigma + sum(w * x0 for w, (_, x0) in zip(weights, history, strict=True))
    )


def _angle(a_bar: float) -> float:
    """φ = arctan(σ/α) of ᾱ."""
    return math.atan2((1 - a_bar) ** 0.5, a_bar**0.5)


def check_order(order: object) -> None:
    """The predictor's order: an integer in [1, MAX_ORDER]."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise ValueError(
            f"sampler.order={order!r}: the ABM predictor's order is an integer from 1 to "
            f"{MAX_ORDER} (its corrector's is one more); give e.g. sampler.order=4"
        )


@torch.no_grad()
def sample_abm(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int | None = 20,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    order: int = 4,
    spacing: str = "angle",
    clip_x0: bool = True,
    final: str = "extrapolated",
) -> Tensor:
    """Adams-Bashforth-Moulton in φ (see the module): one network call per step, predictor of
    order `order` (lower over the first steps, while fewer predictions exist), corrector of
    order + 1. `spacing="angle"` takes steps even in φ; the sample is x̂_0 at t = 0, made
    consistent with the corrected state (ε held), then carried on to σ = 0 in σ²
    (`final="extrapolated"`, `ddpm.sampler_base.to_sigma_zero`) or not (`final="x0"`)."""
    check_order(order)
    check_final(final)
    steps = steps or schedule.num_timesteps
    ts = timesteps(schedule.num_timesteps, steps, spacing, schedule.alphas_cumprod)
    a_bars = schedule.respace(ts).alphas_cumprod.tolist()  # float64, from ᾱ's float64 copy
    x, history, x_before = x_T, [], x_T  # history: (φ, x̂_0) of the last steps, newest last
    for i, idx in enumerate(reversed(range(len(ts)))):
        t = torch.full((x.shape[0],), int(ts[idx]), device=x.device, dtype=torch.long)
        # Evaluate
        x0, _ = x0_and_eps(denoiser, x, t, a_bars[idx], clip_x0)
        if history:
            # Corrector: the last step again, through its predictions and this one
            nodes = [*history, (_angle(a_bars[idx]), x0)]
            corrected = _step(x_before, a_bars[idx + 1], a_bars[idx], nodes)
            if idx == 0:  # x̂_0 of the corrected state, with the evaluated ε held
                x0 = x0 + (corrected - x) / a_bars[0] ** 0.5
            x = corrected
        history = [*history, (_angle(a_bars[idx]), x0)][-order:]
        if idx == 0:
            x = x0.clamp(-1, 1) if clip_x0 else x0
            if final == "extrapolated" and len(history) > 1:
                x = to_sigma_zero(x0, history[-2][1], a_bars[0], a_bars[1], clip_x0)
        else:
            # Predictor
            x_before = x
            x = _step(x, a_bars[idx], a_bars[idx - 1], history)
        if callback is not None:
            callback(i, t, x, x0)
    return x
