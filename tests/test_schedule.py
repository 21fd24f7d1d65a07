import copy
import math
import pickle

import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision

from ddpm.samplers import sample_ddpm
from ddpm.schedule import NoiseSchedule


def test_linear_schedule_matches_ho_et_al():
    s = NoiseSchedule.linear(1000, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    # ᾱ_T of the DDPM schedule, a known figure (Ho et al. choose it so that ᾱ_T ≈ 4e-5)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    assert torch.allclose(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-6)
    assert s.alphas_cumprod.dtype == torch.float32


def test_posterior_variance_closed_form():
    s = NoiseSchedule.linear(1000)
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    a_bar = torch.cumprod(1 - b, 0)
    # t = 0 (the paper's t = 1): ᾱ_{t-1} = 1, so β̃ = 0 and its log is clipped to the next value
    assert s.posterior_variance[0].item() == 0.0
    expected_1 = b[1] * (1 - a_bar[0]) / (1 - a_bar[1])
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(expected_1), rel=1e-6
    )
    expected_last = b[-1] * (1 - a_bar[-2]) / (1 - a_bar[-1])
    assert s.posterior_variance[-1].item() == pytest.approx(expected_last.item(), rel=1e-6)


def test_posterior_mean_is_eq7():
    s = NoiseSchedule.linear(100, 1e-3, 0.05)
    x0, xt = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 40, 99])
    mean, var, _ = s.posterior(x0, xt, t)
    b = torch.linspace(1e-3, 0.05, 100, dtype=torch.float64)
    a = 1 - b
    ab = torch.cumprod(a, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    for i, ti in enumerate(t.tolist()):
        want = (ab_prev[ti].sqrt() * b[ti] / (1 - ab[ti])) * x0[i].double() + (
            a[ti].sqrt() * (1 - ab_prev[ti]) / (1 - ab[ti])
        ) * xt[i].double()
        assert torch.allclose(mean[i].double(), want, atol=1e-5)
        assert var[i].item() == pytest.approx(
            (b[ti] * (1 - ab_prev[ti]) / (1 - ab[ti])).item(), rel=1e-5
        )


def test_cosine_schedule_at_half():
    s = NoiseSchedule.cosine(1000, s=0.008)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # index 499 is the paper's t = 500
    assert s.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-5)
    # β is clipped at 0.999 (in float64; stored as float32)
    assert s.betas[-1].item() == pytest.approx(0.999, rel=1e-7)
    assert s.betas.max().item() == s.betas[-1].item()


def test_sigmoid_schedule_is_valid_and_decreasing():
    s = NoiseSchedule.sigmoid(1000)
    assert torch.all(s.betas > 0) and torch.all(s.betas <= 0.999)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])
    assert s.alphas_cumprod[-1] < 1e-3 < s.alphas_cumprod[0]


def test_q_sample_statistics():
    s = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.5)
    t = torch.full((200_000,), 300)
    xt = s.q_sample(x0, t, torch.randn(200_000, generator=g))
    a = s.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.5, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - a, rel=1e-2)


def test_conversions_invert_each_other():
    s = NoiseSchedule.cosine(1000)
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 998])
    xt = s.q_sample(x0, t, eps)
    assert torch.allclose(s.predict_x0(xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(s.predict_eps(xt[1:], t[1:], x0[1:]), eps[1:], atol=1e-3)
    v = s.velocity(x0, t, eps)
    assert torch.allclose(s.eps_from_v(xt, t, v), eps, atol=1e-4)


def test_snr_is_alpha_bar_ratio():
    s = NoiseSchedule.linear(1000)
    t = torch.tensor([0, 999])
    a = s.alphas_cumprod[t]
    assert torch.allclose(s.snr(t), a / (1 - a))
    assert s.snr(t)[0] > s.snr(t)[1]


@pytest.mark.parametrize(
    "build",
    [
        lambda: NoiseSchedule.linear(1000, 0.0, 0.02),
        lambda: NoiseSchedule.linear(1000, 0.03, 0.02),
        lambda: NoiseSchedule.linear(1000, 1e-4, 1.5),
        lambda: NoiseSchedule.linear(0),
        lambda: NoiseSchedule([0.1, -0.2]),
    ],
)
def test_bad_betas_are_refused(build):
    with pytest.raises(ValueError, match="beta|timesteps"):
        build()


def test_respace_is_the_chain_on_a_subsequence():
    """Respaced: ᾱ equal the training ones at ts, β_i = 1 - ᾱ_ts[i] / ᾱ_ts[i-1], and the eq. 7
    tables follow, bit for bit the float64 formulas on the float64 ᾱ (not the float32 buffer,
    issue 26: 3.6e-4 relative off at linear T = 1000); over every t it is the schedule itself."""
    schedule = NoiseSchedule.linear(1000)
    # the constructor's formula in float64, written out
    a_bar_all = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    for ts in (torch.tensor([0, 10, 400, 999]), torch.arange(1000)):
        chain = schedule.respace(ts)
        a_bar = a_bar_all[ts]
        assert chain.alphas_cumprod.dtype == torch.float64 and chain.num_timesteps == len(ts)
        # the samplers' coefficients, written out: the respaced tables equal them exactly
        a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a_bar[:-1]])
        betas = 1 - a_bar / a_prev
        former = {
            "alphas_cumprod": a_bar,
            "alphas_cumprod_prev": a_prev,
            "betas": betas,
            "posterior_variance": betas * (1 - a_prev) / (1 - a_bar),
            "posterior_mean_coef1": betas * a_prev.sqrt() / (1 - a_bar),
            "posterior_mean_coef2": (1 - a_prev) * (1 - betas).sqrt() / (1 - a_bar),
            "sqrt_recip_alphas_cumprod": (1 / a_bar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / a_bar - 1).sqrt(),
        }
        for name, value in former.items():
            assert torch.equal(getattr(chain, name), value), name
    # every t: the training chain, β to the rounding of 1 - ᾱ_t / ᾱ_{t-1}
    torch.testing.assert_close(chain.betas, schedule.betas64, rtol=1e-12, atol=0)


def improved_diffusion_betas(name: str, T: int, ts: list[int]) -> np.ndarray:
    """The respaced β of improved-diffusion (`get_named_beta_schedule`, `betas_for_alpha_bar`,
    `SpacedDiffusion`), written out again in NumPy float64 from Nichol & Dhariwal 2021."""
    if name == "linear":
        betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    else:
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    last, out, keep = 1.0, [], set(ts)
    for i, a_bar in enumerate(np.cumprod(1.0 - betas)):
        if i in keep:
            out.append(1 - a_bar / last)
            last = a_bar
    return np.array(out)


@pytest.mark.parametrize(("name", "T"), [("cosine", 4000), ("linear", 1000)])
def test_respaced_betas_equal_the_float64_formula(name, T):
    """Issue 26: from the float32 ᾱ they were 3.6e-3 off (cosine T = 4000), 3.6e-4 (linear)."""
    schedule = getattr(NoiseSchedule, name)(T)
    for ts in (list(range(T)), sorted({round(i * (T - 1) / 99) for i in range(100)})):
        got = schedule.respace(torch.tensor(ts)).betas.numpy()
        want = improved_diffusion_betas(name, T, ts)
        assert np.abs(got / want - 1).max() < 1e-12


def test_a_1000_step_ddpm_chain_draws_what_float64_tables_draw():
    """The model's schedule (float32 buffers) and one built in float64 give the very same
    1000-step DDPM sample (a float64 x_T and denoiser): the chain is float64 from the start.
    (Built from the float32 ᾱ, the sample ended 3e-4 away.)"""
    schedule = NoiseSchedule.linear(1000)
    in_float64 = NoiseSchedule(schedule.betas64, "linear", torch.float64)

    def denoiser(x, t):  # exact for N(0.3, 0.5²) data
        a = in_float64.alphas_cumprod[t].reshape(-1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * 0.3) / (a * 0.25 + 1 - a), None

    x_T = torch.randn(2, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = [
        sample_ddpm(denoiser, s, x_T, 1000, generator=torch.Generator().manual_seed(1))
        for s in (schedule, in_float64)
    ]
    assert torch.equal(runs[0], runs[1])


def test_float64_tables_survive_moves_casts_copies_and_checkpoints():
    """β and ᾱ in float64 stay float64 and on the CPU through `.to(device)` (meta here),
    `.half()` and Lightning's bf16-true plugin (`module.to(torch.bfloat16)`), deepcopy and
    pickle; state_dict holds nothing (checkpoints unchanged); respace reads them."""
    schedule = NoiseSchedule.cosine(1000)
    betas, a_bar = schedule.betas64.clone(), schedule.alphas_cumprod64.clone()
    ts = torch.arange(0, 1000, 10)
    chain = schedule.respace(ts)
    assert schedule.state_dict() == {}
    copies = {
        "bf16-true": HalfPrecision("bf16-true").convert_module(copy.deepcopy(schedule)),
        "half": copy.deepcopy(schedule).half(),
        "meta": copy.deepcopy(schedule).to("meta"),
        "pickle": pickle.loads(pickle.dumps(schedule)),
    }
    assert copies["bf16-true"].betas.dtype == torch.bfloat16  # the buffers did follow
    assert copies["meta"].alphas_cumprod.device.type == "meta"
    for name, moved in copies.items():
        assert moved.state_dict() == {}, name
        assert torch.equal(moved.betas64, betas) and torch.equal(moved.alphas_cumprod64, a_bar)
        assert moved.betas64.dtype == torch.float64 and moved.betas64.device.type == "cpu"
        assert torch.equal(moved.respace(ts).posterior_mean_coef1, chain.posterior_mean_coef1)
