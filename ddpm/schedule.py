"""Noise schedules and the closed forms of the forward process.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):

    code name                         paper symbol
    betas                             β_t
    alphas                            α_t = 1 - β_t
    alphas_cumprod                    ᾱ_t = ∏_{s<=t} α_s
    alphas_cumprod_prev               ᾱ_{t-1}   (ᾱ_{-1} := 1)
    posterior_variance                β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t          (eq. 7)
    posterior_mean_coef1 / coef2      the weights of x_0 and x_t in μ̃_t               (eq. 7)

Timesteps are 0-based: index t in 0..T-1 is the paper's step t+1. All tables are computed in
float64 and stored as float32 buffers (the network path), so they follow the module to its device
and dtype. β and ᾱ are also kept in float64 (`betas64`, `alphas_cumprod64`, on the CPU, whatever
the module's device or dtype): `respace(ts)` builds the float64 chain a sampler runs from them,
and `ddpm.likelihood.float64` the bound's tables, so no float32 rounding enters either.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _check_betas(betas: Tensor) -> None:
    if betas.ndim != 1 or betas.numel() < 1:
        raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
    if not torch.all((betas > 0) & (betas < 1)):
        bad = betas[(betas <= 0) | (betas >= 1)]
        raise ValueError(
            f"every beta must lie in (0, 1); got {bad[:3].tolist()} "
            "(check schedule.beta_start / schedule.beta_end / schedule.timesteps)"
        )


def _extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] shaped (B, 1, ..., 1) to broadcast against a (B, ...) tensor of `ndim` dims."""
    return table[t].reshape(t.shape[0], *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """A discrete-time variance schedule β_1..β_T and the closed forms it implies.

    Build it with one of the constructors: `NoiseSchedule.linear`, `.cosine`, `.sigmoid`, or
    directly from a sequence of betas. Tensors are (B, C, H, W) images in [-1, 1] and (B,) int64
    timesteps in [0, T).
    """

    def __init__(
        self,
        betas: Tensor | list[float],
        name: str = "custom",
        dtype: torch.dtype = torch.float32,
        alphas_cumprod: Tensor | None = None,
    ) -> None:
        """`alphas_cumprod`, when given, is ᾱ itself (what `respace` keeps exactly) instead of
        ∏(1 - β), which loses the last bits of a tiny ᾱ."""
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        _check_betas(betas)
        self.name = name
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        if alphas_cumprod is None:
            alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # eq. 7: variance and mean weights of the posterior q(x_{t-1} | x_t, x_0)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # β̃ is 0 at the first step; its log is clipped to the next value, as Ho et al.'s code does
        posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            if self.num_timesteps > 1
            else betas
        )
        posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)

        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": posterior_mean_coef1,
            "posterior_mean_coef2": posterior_mean_coef2,
        }
        for key, value in tables.items():
            # persistent=False: the tables are derived from the config, so checkpoints stay
            # small and a checkpoint never disagrees with the schedule it was trained with.
            self.register_buffer(key, value.to(dtype), persistent=False)
        # Plain attributes, not buffers: `.to(device)`, `.half()` and Lightning's precision
        # plugins (bf16-true: `module.to(torch.bfloat16)`) move and cast buffers only, so these
        # stay float64, on the CPU where their readers (respace, likelihood.float64) want them,
        # and out of state_dict (checkpoints unchanged) and of DDP's buffer broadcast. Copied
        # by deepcopy and pickle as any attribute.
        self.betas64: Tensor = betas.detach().to("cpu", copy=True)
        self.alphas_cumprod64: Tensor = alphas_cumprod.detach().to("cpu", copy=True)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def linear(
        cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """Ho et al. 2020, Sec. 4: β linear from 1e-4 to 0.02 over T = 1000 steps."""
        _check_timesteps(timesteps)
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(
                f"linear schedule needs 0 < beta_start <= beta_end < 1, "
                f"got beta_start={beta_start}, beta_end={beta_end}"
            )
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        return cls(betas, name="linear")

    @classmethod
    def cosine(cls, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Nichol & Dhariwal 2021, eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2)."""
        _check_timesteps(timesteps)
        if s < 0:
            raise ValueError(f"cosine schedule offset s must be >= 0, got {s}")
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        # β_t = 1 - ᾱ_t / ᾱ_{t-1} = 1 - f(t) / f(t-1): f(0) cancels, and dividing by it first
        # would round β_1 ≈ 1e-5 (T = 4000) by 1e-11 relative (improved-diffusion: 4e-13)
        betas = 1 - f[1:] / f[:-1]
        return cls(betas.clamp(max=max_beta), name="cosine")

    @classmethod
    def sigmoid(
        cls,
        timesteps: int = 1000,
        start: float = -3.0,
        end: float = 3.0,
        tau: float = 1.0,
        max_beta: float = 0.999,
    ) -> NoiseSchedule:
        """Jabri et al. 2022 (RIN), Alg. 1: a rescaled sigmoid of (t(end - start) + start)/τ."""
        _check_timesteps(timesteps)
        if not start < end or tau <= 0:
            raise ValueError(
                f"sigmoid schedule needs start < end and tau > 0, got {start}, {end}, {tau}"
            )
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
        v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
        f = (v_end - torch.sigmoid((steps * (end - start) + start) / tau)) / (v_end - v_start)
        betas = 1 - f[1:] / f[:-1]
        return cls(betas.clamp(min=1e-8, max=max_beta), name="sigmoid")

    def respace(self, ts: Tensor) -> NoiseSchedule:
        """The chain a sampler runs on the increasing subsequence `ts` of timesteps: entry i is
        training step ts[i], with β_i = 1 - ᾱ_ts[i] / ᾱ_ts[i-1] so that the respaced ᾱ equal the
        training ones there (Nichol & Dhariwal 2021, Sec. 4; with every t it is this chain).

        Built from the float64 ᾱ (`alphas_cumprod64`, not the float32 buffer) and kept in
        float64: samplers read its tables as Python floats, so a 1000-step chain's coefficients
        carry no float32 rounding."""
        a_bar = self.alphas_cumprod64[ts.cpu()]
        a_bar_prev = torch.cat([a_bar.new_ones(1), a_bar[:-1]])
        betas = 1 - a_bar / a_bar_prev
        return NoiseSchedule(betas, f"{self.name}[{len(ts)}]", torch.float64, alphas_cumprod=a_bar)

    # ---------------------------------------------------------------- closed forms
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """eq. 4: x_t = √ᾱ_t · x_0 + √(1 - ᾱ_t) · ε."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """eq. 15 inverted: x_0 = (x_t - √(1 - ᾱ_t) · ε) / √ᾱ_t."""
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
        )

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """ε from x_t and x_0: (x_t / √ᾱ_t - x_0) / √(1/ᾱ_t - 1)."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
        )

    def velocity(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Salimans & Ho 2022, Sec. 4: v = √ᾱ_t · ε - √(1 - ᾱ_t) · x_0."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
        )

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """ε = √(1 - ᾱ_t) · x_t + √ᾱ_t · v."""
        return (
            _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
            + _extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * v
        )

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """eqs. 6-7: mean μ̃_t(x_t, x_0), variance β̃_t and clipped log β̃_t of q(x_{t-1}|x_t, x_0)."""
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
            + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )
        variance = _extract(self.posterior_variance, t, x_t.ndim)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        return mean, variance, log_variance

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021), shape (B,)."""
        a = self.alphas_cumprod[t]
        return a / (1.0 - a)

    def extra_repr(self) -> str:
        return f"name={self.name}, timesteps={self.num_timesteps}"


def _check_timesteps(timesteps: int) -> None:
    if int(timesteps) != timesteps or timesteps < 1:
        raise ValueError(f"schedule.timesteps must be a positive integer, got {timesteps!r}")
