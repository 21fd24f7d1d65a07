"""What the network predicts and how its error is weighted: the training target of each
objective, min-SNR loss weights, the conversion of a prediction to ε, and classifier-free
guidance. Plain functions of tensors and a `NoiseSchedule`; `DiffusionModule.loss_fn` and its
denoisers are made of them.

    objective   the network predicts                          paper
    eps         ε, the noise in x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε    Ho et al. 2020, eq. 14
    x0          x_0 itself
    v           v = √ᾱ_t ε - √(1 - ᾱ_t) x_0                     Salimans & Ho 2022, Sec. 4

Notation as in `ddpm.schedule`: SNR(t) = ᾱ_t / (1 - ᾱ_t), t the (B,) int64 training timesteps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm.likelihood import learned_vb_term_bpd
from ddpm.schedule import NoiseSchedule

OBJECTIVES = ("eps", "x0", "v")
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}
# module.loss: the error of the prediction (LOSSES), or the bound itself (L_vlb)
LOSS_NAMES = (*LOSSES, "vlb")
WEIGHTINGS = ("none", "min_snr")


class Prediction(NamedTuple):
    """What a denoiser returns at (x_t, t): ε̂ (B, C, H, W), whatever the network predicts, and
    v (B, C, H, W) in about [-1, 1], the learned reverse variance's interpolation between log β̃_t
    and log β_t (Nichol & Dhariwal 2021, eq. 15), or None for a fixed variance. A tuple, so
    `eps, v = denoiser(x_t, t)` reads it too (the samplers and the bound do)."""

    eps: Tensor
    v: Tensor | None = None


# denoiser(x_t, t) -> Prediction(ε̂, v) for (B,) int64 timesteps of the training chain
Denoiser = Callable[[Tensor, Tensor], Prediction]


def split_output(out: Tensor, learn_sigma: bool) -> tuple[Tensor, Tensor | None]:
    """The network's output -> (its prediction per objective, v or None): a learned-variance
    network outputs twice the channels, the prediction first."""
    if not learn_sigma:
        return out, None
    prediction, v = out.chunk(2, dim=1)
    return prediction, v


def training_target(
    objective: str, schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor
) -> Tensor:
    """What the network is trained to output at x_t = q_sample(x0, t, noise): ε, x_0 or v."""
    if objective == "eps":
        return noise
    if objective == "x0":
        return x0
    return schedule.velocity(x0, t, noise)  # "v"


def per_sample_loss(loss: str, out: Tensor, target: Tensor) -> Tensor:
    """The error `loss` ("mse" or "l1") of each sample (B,), averaged over its pixels, in
    float32."""
    per_pixel = LOSSES[loss](out.float(), target.float(), reduction="none")
    return per_pixel.flatten(1).mean(1)


def check_vlb(loss: str, learn_sigma: bool, loss_weighting: str, vlb_weight: float) -> None:
    """L_vlb's options: λ of L_hybrid, and module.loss=vlb, which trains on L_vlb alone (iDDPM's
    L_vlb rows, improved-diffusion's --use_kl True): the bound of a learned reverse variance,
    not an error to weigh."""
    if vlb_weight < 0:
        raise ValueError(f"module.vlb_weight must be >= 0, got {vlb_weight}")
    if loss != "vlb":
        return
    if not learn_sigma:
        raise ValueError(
            "module.loss=vlb trains the bound L_vlb through the learned variance (iDDPM's "
            "--use_kl True --learn_sigma True): set module.learn_sigma=true"
        )
    if loss_weighting != "none":
        raise ValueError(
            f"module.loss_weighting={loss_weighting} weighs a prediction's error; module.loss=vlb "
            "is the bound itself, weighted by nothing: set module.loss_weighting=none"
        )


def vb_term(
    objective: str,
    schedule: NoiseSchedule,
    out: Tensor,
    v: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
) -> Tensor:
    """L_t (B,) in bits/dim, the bound's term of the drawn t (L_0 at t = 0) under the learned
    variance v, from the network's prediction `out` per objective; T times it at uniform t
    estimates L_vlb (Nichol & Dhariwal 2021, Sec. 3.1). Detach `out` to stop the mean's
    gradient (L_hybrid's L_vlb trains only the variance); L_vlb alone trains both."""
    eps = eps_from_output(objective, schedule, out.float(), x_t.float(), t)
    return learned_vb_term_bpd(schedule, x0, x_t, t, eps, v)


def check_min_snr_gamma(gamma: Any) -> None:
    """γ of min-SNR weighting caps the x_0 weight min(SNR, γ): at 0 every loss is 0 (nothing
    trains) and below 0 the weights are negative, so the optimizer ascends the loss (nan fails
    `> 0` too; inf, no cap, is the ε loss and allowed)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(
            "module.min_snr_gamma must be a number > 0 (the cap γ of min(SNR, γ); Hang et al. "
            f"use 5, module.min_snr_gamma=5); got {gamma!r}"
        )


def min_snr_weight(objective: str, snr: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ weights (B,) (Hang et al. 2023): weight min(SNR, γ) on the x_0 error, expressed
    for the objective's own error. ||ε̂ - ε||² = SNR · ||x̂_0 - x_0||² and ||v̂ - v||² =
    (SNR + 1) · ||x̂_0 - x_0||², so ε gets min(SNR, γ) / SNR, x0 min(SNR, γ) and v
    min(SNR, γ) / (SNR + 1)."""
    x0_weight = snr.clamp(max=gamma)
    if objective == "eps":
        return x0_weight / snr
    if objective == "x0":
        return x0_weight
    return x0_weight / (snr + 1)  # "v"


def eps_from_output(
    objective: str, schedule: NoiseSchedule, out: Tensor, x_t: Tensor, t: Tensor
) -> Tensor:
    """The network's prediction (per `objective`) at x_t -> ε, which the samplers take."""
    if objective == "eps":
        return out
    if objective == "x0":
        return schedule.predict_eps(x_t, t, out)
    return schedule.eps_from_v(x_t, t, out)


def drop_labels(y: Tensor, null_label: int, p: float) -> Tensor:
    """Labels (B,) with each replaced by the null label with probability p, from torch's global
    RNG: the conditional and the unconditional model trained as one network (Ho & Salimans
    2022, Algorithm 1)."""
    drop = torch.rand(y.shape[0], device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)


def classifier_free_guidance(both: Prediction, w: float) -> Prediction:
    """Guided ε from a prediction on the batch [conditional; unconditional] (2B, ...):
    (1 + w) ε(x_t, y) - w ε(x_t, ∅) (Ho & Salimans 2022, eq. 6), and the conditional half's v
    (as GLIDE guides only the mean). w = 0 is the conditional prediction."""
    cond, uncond = both.eps.chunk(2)
    eps = (1 + w) * cond - w * uncond
    return Prediction(eps, None if both.v is None else both.v.chunk(2)[0])
