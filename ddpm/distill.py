"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2): a student learns to take in ONE DDIM step what its teacher takes
in two; the student then teaches the next one at half the steps. The math of one stage: the
nested step grids, the teacher's two DDIM steps, the student's target x̃ and its loss weight.
`ddpm.distillation.StudentModule` trains with them.

Notation (Salimans & Ho, Sec. 2 and Algorithm 2; variance preserving, α² + σ² = 1):

    code name                 paper symbol
    alpha, sigma              α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t)   (ᾱ of "clean", index -1, := 1)
    t, t_mid, t_prev          t, t' = t - 0.5/N, t'' = t - 1/N: one student step, two teacher steps
    z_t, z_mid, z_prev        z_t, z_t', z_t''
    x0                        x̂_η(z_t): the teacher's (guided, clipped) estimate of x
    x_tilde                   x̃: the x that takes the student from z_t to z_t'' in one step

Timesteps are the (B,) int64 training steps of `ddpm.schedule`; -1 stands for t = 0 of the
paper (the clean image, where the last step of every sampler lands).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ddpm.grids import timesteps
from ddpm.schedule import NoiseSchedule

CLEAN = -1  # the timestep index of x itself (ᾱ = 1): where a sampler's last step lands
# the x_0 estimator of a teacher at (z_t, t): (B, C, H, W), (B,) -> (B, C, H, W)
X0Fn = Callable[[Tensor, Tensor], Tensor]


def halvings(teacher_steps: int, steps: int) -> list[int]:
    """The students' step counts, stage by stage: 64 -> 4 gives [32, 16, 8, 4]. Refuses a
    target the teacher's steps do not halve to (48 -> 4: 24, 12, 6, 3)."""
    counts, n = [], teacher_steps
    while n > steps and n % 2 == 0:
        n //= 2
        counts.append(n)
    if n != steps or not counts:
        raise ValueError(
            f"distill.teacher_steps={teacher_steps} does not halve to distill.steps={steps} "
            f"(each stage halves the steps): give teacher_steps = steps * 2^k, e.g. "
            f"distill.teacher_steps={steps * 16}"
        )
    return counts


def stage_grids(num_timesteps: int, steps: int) -> tuple[Tensor, Tensor]:
    """The student's N-step grid (N,) and the teacher's 2N-step grid (2N,), both increasing
    training timesteps of the trailing spacing (`ddpm.samplers.timesteps`): the student's is
    every other point of the teacher's, ts_student[i] = ts_teacher[2i + 1]."""
    student = timesteps(num_timesteps, steps, "trailing")
    teacher = timesteps(num_timesteps, 2 * steps, "trailing")
    if not torch.equal(teacher[1::2], student):  # trailing spacing nests by construction
        raise AssertionError(f"the {steps}- and {2 * steps}-step grids do not nest")
    return student, teacher


def step_times(student: Tensor, teacher: Tensor, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(t, t', t'') (B,) each of the student's steps i (B,) in 0..N-1 (step i goes from
    student[i] down to student[i - 1], or to the clean image for i = 0), on the teacher's grid."""
    t = teacher[2 * i + 1]
    t_mid = teacher[2 * i]
    clean = torch.full_like(t, CLEAN)
    t_prev = torch.where(i > 0, teacher[(2 * i - 1).clamp(min=0)], clean)
    return t, t_mid, t_prev


def alpha_sigma(schedule: NoiseSchedule, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
    """(α_t, σ_t) as (B, 1, ..., 1) float32 for timesteps t (B,), with t = -1 the clean image
    (α = 1, σ = 0)."""
    a_bar = schedule.alphas_cumprod[t.clamp(min=0)]
    a_bar = torch.where(t >= 0, a_bar, torch.ones_like(a_bar))
    shape = (t.shape[0], *([1] * (ndim - 1)))
    return a_bar.sqrt().reshape(shape), (1 - a_bar).clamp(min=0).sqrt().reshape(shape)


def ddim_step(x0: Tensor, z_t: Tensor, at: tuple[Tensor, Tensor], to: tuple[Tensor, Tensor]):
    """One deterministic DDIM step (η = 0) from z_t to z_s given the estimate x̂ (Algorithm 2,
    lines 6 and 8): z_s = α_s x̂ + (σ_s / σ_t)(z_t - α_t x̂). `at` = (α_t, σ_t), `to` = (α_s,
    σ_s); the same as `ddpm.samplers.sample_ddim`'s eq. 12 with its ε refitted to the x̂."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = at, to
    return alpha_s * x0 + (sigma_s / sigma_t) * (z_t - alpha_t * x0)


def teacher_two_steps(
    x0_fn: X0Fn, schedule: NoiseSchedule, z_t: Tensor, times: tuple[Tensor, Tensor, Tensor]
) -> Tensor:
    """z_t'' (B, C, H, W): two DDIM steps of the teacher, t -> t' -> t'' (Algorithm 2, lines
    5-8). `x0_fn(z, t)` is the teacher's x̂ (guided and clipped as its sampler would)."""
    t, t_mid, t_prev = times
    at, mid, prev = (alpha_sigma(schedule, s, z_t.ndim) for s in (t, t_mid, t_prev))
    z_mid = ddim_step(x0_fn(z_t, t), z_t, at, mid)
    return ddim_step(x0_fn(z_mid, t_mid), z_mid, mid, prev)


def distillation_target(
    z_t: Tensor, z_prev: Tensor, at: tuple[Tensor, Tensor], prev: tuple[Tensor, Tensor]
) -> Tensor:
    """x̃ (B, C, H, W) = (z_t'' - (σ_t''/σ_t) z_t) / (α_t'' - (σ_t''/σ_t) α_t) (Algorithm 2,
    line 9): the x̂ with which one DDIM step of the student from z_t lands on the teacher's
    z_t''. `at` = (α_t, σ_t), `prev` = (α_t'', σ_t'') of `alpha_sigma`."""
    (alpha_t, sigma_t), (alpha_prev, sigma_prev) = at, prev
    ratio = sigma_prev / sigma_t
    return (z_prev - ratio * z_t) / (alpha_prev - ratio * alpha_t)


def truncated_snr_weight(snr: Tensor) -> Tensor:
    """max(SNR, 1) (B,): the "truncated SNR" weight of the x̂ error (Salimans & Ho, Sec. 4), which
    keeps the weight of the pure-noise end (SNR -> 0) at 1 where the plain SNR weight vanishes."""
    return snr.clamp(min=1.0)


def x0_from_output(
    objective: str, schedule: NoiseSchedule, out: Tensor, z_t: Tensor, t: Tensor
) -> Tensor:
    """The network's prediction (eps, x0 or v, `ddpm.objectives`) -> x̂ (B, C, H, W), directly
    (x̂ = α z - σ v for v) rather than through ε, whose (z - σ ε) / α loses float32 digits at
    the pure-noise end (α_T ≈ 5e-5 under the cosine schedule)."""
    if objective == "x0":
        return out
    alpha, sigma = alpha_sigma(schedule, t, z_t.ndim)
    if objective == "v":
        return alpha * z_t - sigma * out
    return (z_t - sigma * out) / alpha  # "eps": eq. 15 of Ho et al.
