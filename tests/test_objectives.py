"""The training objective's math (ddpm.objectives): targets, min-SNR weights, the conversion to
ε, label dropout and classifier-free guidance, on exact float64 tensors in milliseconds."""

import math

import pytest
import torch

import ddpm.module
from ddpm.objectives import (
    LOSSES,
    OBJECTIVES,
    WEIGHTINGS,
    Prediction,
    classifier_free_guidance,
    drop_labels,
    eps_from_output,
    min_snr_weight,
    per_sample_loss,
    split_output,
    training_target,
)
from ddpm.schedule import NoiseSchedule

# the schedule's tables in float64, so the identities below hold to ~1e-12
LINEAR64 = NoiseSchedule(NoiseSchedule.linear(1000).betas.double(), "linear", torch.float64)
T = torch.tensor([0, 10, 250, 500, 999])


def draws(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(5, 1, 8, 8, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(5, 1, 8, 8, generator=g, dtype=dtype)
    return x0, eps


def test_the_module_keeps_the_names():
    assert ddpm.module.OBJECTIVES is OBJECTIVES == ("eps", "x0", "v")
    assert ddpm.module.WEIGHTINGS is WEIGHTINGS == ("none", "min_snr")
    assert ddpm.module.LOSSES is LOSSES and sorted(LOSSES) == ["l1", "mse"]


def test_eps_from_output_inverts_each_objective():
    """Given the true target of each objective, eps_from_output must recover the true ε (the
    float32 schedule of a training run, as DiffusionModule has it)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([5, 50, 95])
    s = NoiseSchedule.linear(100, beta_end=0.1)
    x_t = s.q_sample(x0, t, eps)
    for objective in OBJECTIVES:
        target = training_target(objective, s, x0, t, eps)
        assert torch.allclose(eps_from_output(objective, s, target, x_t, t), eps, atol=2e-3)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_target_gives_back_x0_and_eps_through_the_schedule(objective):
    x0, eps = draws()
    x_t = LINEAR64.q_sample(x0, T, eps)
    target = training_target(objective, LINEAR64, x0, T, eps)
    got_eps = eps_from_output(objective, LINEAR64, target, x_t, T)
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9)
    # and x_0 from that ε (eq. 15)
    x0_hat = LINEAR64.predict_x0(x_t, T, got_eps)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)


def test_the_targets_are_eps_x0_and_v():
    x0, eps = draws()
    assert training_target("eps", LINEAR64, x0, T, eps) is eps
    assert training_target("x0", LINEAR64, x0, T, eps) is x0
    a = LINEAR64.alphas_cumprod[T].reshape(-1, 1, 1, 1)
    want = a.sqrt() * eps - (1 - a).sqrt() * x0  # Salimans & Ho, Sec. 4
    torch.testing.assert_close(training_target("v", LINEAR64, x0, T, eps), want)


@pytest.mark.parametrize("gamma", [1.0, 5.0, math.inf])
def test_min_snr_weights(gamma):
    """The weights of Hang et al. 2023 per objective: min(SNR, γ)/SNR for ε, min(SNR, γ) for
    x_0, min(SNR, γ)/(SNR + 1) for v."""
    snr = LINEAR64.snr(T)
    capped = torch.minimum(snr, torch.tensor(gamma, dtype=snr.dtype))
    torch.testing.assert_close(min_snr_weight("eps", snr, gamma), capped / snr)
    torch.testing.assert_close(min_snr_weight("x0", snr, gamma), capped)
    torch.testing.assert_close(min_snr_weight("v", snr, gamma), capped / (snr + 1))
    if gamma == math.inf:  # no cap: the ε loss is the plain one (weight 1)
        torch.testing.assert_close(min_snr_weight("eps", snr, gamma), torch.ones_like(snr))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_weights_put_min_snr_gamma_on_the_x0_error(objective):
    """One wrong x̂_0, expressed as each objective's output: its weighted MSE is the same
    min(SNR, γ) · ||x̂_0 - x_0||² whatever the network predicts."""
    x0, eps = draws()
    x_t = LINEAR64.q_sample(x0, T, eps)
    x0_hat = x0 + 0.1 * draws(seed=1)[1]
    eps_hat = LINEAR64.predict_eps(x_t, T, x0_hat)
    output = {"eps": eps_hat, "x0": x0_hat, "v": LINEAR64.velocity(x0_hat, T, eps_hat)}
    snr, gamma = LINEAR64.snr(T), 5.0
    target = training_target(objective, LINEAR64, x0, T, eps)
    mse = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)  # noqa: E731 (float64, not the loss's 32)
    weighted = min_snr_weight(objective, snr, gamma) * mse(output[objective], target)
    want = snr.clamp(max=gamma) * mse(x0_hat, x0)
    torch.testing.assert_close(weighted, want, rtol=1e-9, atol=0)


def test_per_sample_loss_averages_over_pixels_in_float32():
    a, b = draws()
    mse = per_sample_loss("mse", a, b)
    assert mse.dtype == torch.float32 and mse.shape == (5,)
    torch.testing.assert_close(mse, ((a - b) ** 2).flatten(1).mean(1).float())
    torch.testing.assert_close(
        per_sample_loss("l1", a, b), (a - b).abs().flatten(1).mean(1).float()
    )


def test_split_output():
    out = torch.randn(2, 6, 4, 4)
    same, none = split_output(out, learn_sigma=False)
    assert same is out and none is None
    prediction, v = split_output(out, learn_sigma=True)
    assert torch.equal(prediction, out[:, :3]) and torch.equal(v, out[:, 3:])


def test_classifier_free_guidance():
    cond, uncond, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(6, 2, 4, 4)
    both = Prediction(torch.cat([cond, uncond]), v)
    # w = 0 is the conditional prediction; its v is the conditional half's
    zero = classifier_free_guidance(both, 0.0)
    assert torch.equal(zero.eps, cond) and torch.equal(zero.v, v[:3])
    # Ho & Salimans eq. 6: (1 + w) ε(x, y) - w ε(x, ∅)
    torch.testing.assert_close(classifier_free_guidance(both, 2.0).eps, 3 * cond - 2 * uncond)
    assert classifier_free_guidance(Prediction(both.eps), 2.0).v is None


def test_drop_labels():
    y = torch.arange(10).repeat(400)
    assert torch.equal(drop_labels(y, 10, 0.0), y)
    assert (drop_labels(y, 10, 1.0) == 10).all()
    torch.manual_seed(0)
    dropped = drop_labels(y, 10, 0.25)
    torch.manual_seed(0)
    assert torch.equal(drop_labels(y, 10, 0.25), dropped)  # torch's global RNG
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])  # a label is kept or nulled, never changed
    assert abs((~kept).float().mean().item() - 0.25) < 0.03  # 4000 draws: ±4.4 σ


def test_a_prediction_is_a_pair():
    eps = torch.zeros(1)
    assert Prediction(eps) == (eps, None)
    got_eps, v = Prediction(eps, eps)
    assert got_eps is eps and v is eps
