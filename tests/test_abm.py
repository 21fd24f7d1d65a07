"""ABM (ddpm/abm.py): its quadrature, its corrector's order, issue 26's bar on the exact ODE of
Gaussian data (the diffusers half is the slow test_samplers.py::test_best_samplers_against_
diffusers_dpmpp_2m), and its bad options refused by name."""

import math

import numpy as np
import pytest
import torch

import bench.ode_error as ode
from ddpm.abm import angle_weights, sample_abm
from ddpm.objectives import Prediction
from ddpm.samplers import sample_ddim, sampler_settings
from ddpm.schedule import NoiseSchedule


def reference_weights(nodes, low, high, n=400):
    """The same integrals by 400-point Gauss-Legendre in φ itself (no change of variable)."""
    x, w = np.polynomial.legendre.leggauss(n)
    phi = 0.5 * (high - low) * x + 0.5 * (high + low)
    dphi = 0.5 * (high - low) * w / np.sin(phi) ** 2
    out = []
    for j, node in enumerate(nodes):
        basis = np.prod([(phi - o) / (node - o) for m, o in enumerate(nodes) if m != j], axis=0)
        out.append(float((dphi * basis).sum()))
    return out


@pytest.mark.parametrize(
    "nodes, low, high",
    [
        ([1.5, 1.4, 1.3, 1.2], 1.1, 1.2),  # the noisy end
        ([0.4, 0.3, 0.2, 0.1, 0.05], 0.006, 0.05),  # the last step of the cosine schedule
        ([0.3, 0.1], 0.01, 0.1),
    ],
)
def test_angle_weights_are_the_integrals(nodes, low, high):
    got = angle_weights(nodes, low, high)
    want = reference_weights(nodes, low, high)
    assert np.allclose(got, want, rtol=1e-11, atol=0), (got, want)
    # the basis sums to 1: the weights sum to ∫ dφ/sin²φ = cot(low) - cot(high)
    assert math.isclose(sum(got), 1 / math.tan(low) - 1 / math.tan(high), rel_tol=1e-12)


def exact_ode_errors(sampler, name: str, steps, s: float = 0.6, **options) -> list[float]:
    """bench/ode_error.py's measure: max error over its 2,000 pixels against the σ = 0 end of
    the exact ODE of N(μ, s²) data, float64, no clipping."""
    spread, ode.S = ode.S, s  # the bench's exact denoiser reads its module's S
    try:
        schedule = getattr(NoiseSchedule, name)(1000)
        x_T, _, end = ode.start_and_end(schedule)
        eps = ode.exact_eps(schedule)
        return [
            (sampler(eps, schedule, x_T, n, clip_x0=False, **options) - end).abs().max().item()
            for n in steps
        ]
    finally:
        ode.S = spread


def gaussian_errors(order: int, steps: list[int], name: str = "cosine", s: float = 0.6):
    return exact_ode_errors(sample_abm, name, steps, s=s, order=order)


@pytest.mark.parametrize("order, rate", [(1, 2), (2, 3), (3, 4)])
def test_the_corrector_raises_the_order_by_one(order, rate):
    """Predictor of order k, corrector of k + 1: from 100 to 200 steps (cosine, where t is
    even in φ) the error falls by ~2^(k+1), not 2^k."""
    e100, e200 = gaussian_errors(order, [100, 200])
    assert e100 / e200 > 2 ** (rate - 0.4), (order, e100, e200)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("s", [0.3, 0.6, 1.0])
def test_abm_falls_at_every_count_and_beats_ddim(name, s):
    """Issue 26's bar (the half without diffusers): at 10, 15, 20, 30, 50 and 100 steps the
    default ABM is below DDIM (by 2x or more at 10 steps, by ~100x at 30) and its error falls
    at every count, for data of std 0.3, 0.6 and 1.0 on both schedules."""
    abm = exact_ode_errors(sample_abm, name, ode.CHECKED, s=s)
    ddim = exact_ode_errors(sample_ddim, name, ode.CHECKED, s=s)
    assert all(a < d for a, d in zip(abm, ddim, strict=True)), (abm, ddim)
    assert all(b < a for a, b in zip(abm, abm[1:], strict=False)), abm


def test_one_network_call_per_step_on_the_angle_grid():
    schedule = NoiseSchedule.cosine(1000)
    seen = []

    def eps(x, t):
        seen.append(int(t[0]))
        return Prediction(torch.zeros_like(x))

    sample_abm(eps, schedule, torch.randn(2, 1, 4, 4), 12)
    assert len(seen) == 12 and seen[0] == 999 and seen[-1] == 0
    phi = [math.atan(math.sqrt((1 - a) / a)) for a in schedule.alphas_cumprod64[seen].tolist()]
    gaps = np.diff(phi)[1:-1]  # even in φ up to rounding t to integers
    assert gaps.max() / gaps.min() < 1.1, gaps


def test_bad_order_and_final_are_refused_by_name():
    x_T = torch.randn(1, 1, 4, 4)

    def eps(x, t):
        return Prediction(torch.zeros_like(x))

    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"sampler.order=.*integer from 1 to 4"):
            sample_abm(eps, NoiseSchedule.linear(100), x_T, 5, order=bad)
    with pytest.raises(ValueError, match=r"sampler.final='end'"):
        sample_abm(eps, NoiseSchedule.linear(100), x_T, 5, final="end")
    settings = sampler_settings({"name": "abm", "steps": 20, "order": 3, "spacing": "broad"})
    assert settings == {"sampler": "abm", "steps": 20, "order": 3, "spacing": "broad"}
    with pytest.raises(ValueError, match="sampler option 'ordre' is not one of abm's"):
        sampler_settings({"name": "abm", "ordre": 3})
