import pytest
import torch

from ddpm.samplers import image_generators, randn, sample_ddpm, timesteps
from ddpm.schedule import NoiseSchedule


def dummy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A model of known output (diffusers' test trick): ε = x · t / (t + 1)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * t / (t + 1)


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
        dummy_eps,
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
    a = sample_ddpm(dummy_eps, schedule, x_T, 50, generator=image_generators(1, 0, 2))
    b = sample_ddpm(dummy_eps, schedule, x_T, 50, generator=image_generators(1, 0, 2))
    c = sample_ddpm(dummy_eps, schedule, x_T, 50, generator=image_generators(2, 0, 2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_callback_sees_every_step_in_order():
    schedule = NoiseSchedule.linear(1000)
    seen = []
    sample_ddpm(
        dummy_eps,
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
        lambda x, t: -10 * torch.ones_like(x),
        schedule,
        torch.randn(2, 1, 4, 4),
        100,
        callback=lambda i, t, x, x0: x0s.append(x0),
    )
    assert all(x0.abs().max() <= 1 for x0 in x0s)
