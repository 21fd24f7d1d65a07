"""Which timestep t each training sample is drawn at: uniformly (Ho et al. 2020, Algorithm 1),
or importance-sampled from the losses seen so far (Nichol & Dhariwal 2021, Sec. 3.3, eq. 18).

Notation:

    T        number of timesteps; t in 0..T-1 (0-based, as in `ddpm.schedule`)
    L_t      a sample's training loss at t (for L_vlb: T times the bound's term of t)
    p(t)     the distribution t is drawn from
    w(t)     = 1 / (T p(t)), the weight a loss drawn at t is multiplied by
    K        losses kept per t (improved-diffusion's history_per_term = 10)
    u        the uniform part mixed into p (improved-diffusion's uniform_prob = 0.001)

Unbiased whatever p is: E_{t~p}[w(t) L_t] = Σ_t p(t) L_t / (T p(t)) = (1/T) Σ_t L_t, the
expectation under uniform t, so the weighted loss estimates the same objective. Its variance
is smallest for p(t) ∝ √E[L_t²] (eq. 18), which `LossSecondMomentSampler` estimates from the
last K losses of each t, drawing uniformly until every t has K of them (the warm-up).

Hand-written, re-derived from the paper and improved-diffusion's resample.py: no installable
library has it (improved-diffusion is not a package on PyPI, and its version is numpy on the
host, one .item() per loss; this one stays on the module's device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLERS = ("uniform", "loss_second_moment")
HISTORY = 10  # K
UNIFORM_PROB = 0.001  # u

# gather(t, losses) -> (t, losses) of every rank, the same on each (`all_gather_losses`)
Gather = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def check_timestep_sampler(name: Any) -> None:
    if name not in SAMPLERS:
        raise ValueError(
            f"module.timestep_sampler must be one of {SAMPLERS} (uniform: Ho et al.; "
            f"loss_second_moment: iDDPM's importance sampling of t), got {name!r}"
        )


def uniform_timesteps(
    num_timesteps: int, batch: int, device: Any, generator: torch.Generator | None = None
) -> Tensor:
    """t ~ U{0, ..., T-1}, (batch,) int64: the draw training has always made (same stream)."""
    return torch.randint(0, num_timesteps, (batch,), device=device, generator=generator)


class UniformSampler(nn.Module):
    """p(t) = 1/T and no weights: Ho et al.'s draw, and the RNG stream of every run before
    samplers were configurable. No state (so a checkpoint's state dict is as it was)."""

    loss_aware = False

    def __init__(self, num_timesteps: int) -> None:
        super().__init__()
        self.num_timesteps = num_timesteps

    def probabilities(self) -> Tensor:
        """p(t) (T,), float64."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch: int, device: Any, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(t (batch,) int64, None): uniform t needs no weights."""
        return uniform_timesteps(self.num_timesteps, batch, device, generator), None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # A run that drew t by loss_second_moment, resumed with uniform t: its loss history
        # is not needed, so its keys are taken as read (not "unexpected"). As BatchNorm does,
        # this hook is where a module decides which of its keys it reads.
        return


class LossSecondMomentSampler(nn.Module):
    """p(t) ∝ √E[L_t²] over the last K losses of each t, mixed with u of the uniform p, after a
    warm-up of uniform draws until every t has K losses; each loss weighted by w(t) = 1/(T p(t)).

    The history is two buffers, `history` (T, K) float64 and `seen` (T,) int64 (losses recorded
    per t, ever): they are in the module's state dict, so every checkpoint keeps them and a
    resumed run goes on drawing from the same p(t). `update` records every rank's losses
    (`all_gather_losses`), so that all ranks keep the same history and draw from one p(t).
    """

    loss_aware = True

    def __init__(
        self, num_timesteps: int, history: int = HISTORY, uniform_prob: float = UNIFORM_PROB
    ) -> None:
        super().__init__()
        self.num_timesteps, self.K, self.uniform_prob = num_timesteps, history, uniform_prob
        # history[t, (seen[t] + j) % K]: a ring of the last K losses of t, oldest first
        self.register_buffer("history", torch.zeros(num_timesteps, history, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(num_timesteps, dtype=torch.long))

    def warmed_up(self) -> Tensor:
        """A 0-dim bool tensor (no host sync): whether every t has K losses."""
        return (self.seen >= self.K).all()

    def probabilities(self) -> Tensor:
        """p(t) (T,), float64 on the buffers' device: uniform during the warm-up, then
        (1 - u) √E[L_t²] / Σ_s √E[L_s²] + u / T (eq. 18 and improved-diffusion's mixing)."""
        T = self.num_timesteps
        root_mean_square = self.history.square().mean(1).sqrt()  # √E[L_t²] (T,)
        total = root_mean_square.sum()
        p = (1 - self.uniform_prob) * root_mean_square / total + self.uniform_prob / T
        uniform = torch.full_like(p, 1.0 / T)
        # all-zero losses (nothing to weigh by) stay uniform, as during the warm-up
        return torch.where(self.warmed_up() & (total > 0), p, uniform)

    def sample(
        self, batch: int, device: Any, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(t (batch,) int64, w(t) (batch,) float32), t ~ p and w(t) = 1 / (T p(t))."""
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor, gather: Gather | None = None) -> None:
        """Record the per-sample losses (B,) drawn at t (B,) on this rank, with those of every
        other rank (`gather`, default `all_gather_losses`: a collective, so every rank calls
        it at every step); the unweighted losses, as improved-diffusion records them."""
        t, losses = (gather or all_gather_losses)(t.detach(), losses.detach())
        self.record(t, losses)

    @torch.no_grad()
    def record(self, t: Tensor, losses: Tensor) -> None:
        """Append losses (N,) at t (N,) in order (a later loss of one t is the newer) to each
        t's ring of the last K, dropping the oldest. Non-finite losses (a skipped step of
        module.nonfinite=skip) are not recorded: one would make p(t) NaN for good."""
        K = self.K
        finite = torch.isfinite(losses)
        t, losses = t[finite].to(self.seen.device), losses[finite].to(self.history)
        # group by t, keeping the order within each t (a stable sort), and rank each loss in
        # its group: 0 for the oldest of this batch's losses of that t
        t, order = torch.sort(t, stable=True)
        losses = losses[order]
        n = torch.bincount(t, minlength=self.num_timesteps)  # new losses per t
        first = torch.cumsum(n, 0) - n  # where each t's group starts in the sorted batch
        rank = torch.arange(len(t), device=t.device) - first[t]
        # only the last K of a group can survive; their slots in the ring are all distinct,
        # so the scatter below writes each slot once (deterministic on any device)
        keep = rank >= n[t] - K
        slot = (self.seen[t] + rank) % K
        self.history[t[keep], slot[keep]] = losses[keep]
        self.seen += n

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # A run that drew t uniformly, resumed with loss_second_moment: its checkpoint holds
        # no history, so this one starts its warm-up here instead of failing the strict load.
        if not any(key.startswith(prefix) for key in state_dict):
            return
        super()._load_from_state_dict(state_dict, prefix, *args)


def make_timestep_sampler(name: str, num_timesteps: int) -> nn.Module:
    """`module.timestep_sampler` -> its sampler for a schedule of T = num_timesteps."""
    check_timestep_sampler(name)
    if name == "uniform":
        return UniformSampler(num_timesteps)
    return LossSecondMomentSampler(num_timesteps)


def all_gather_losses(t: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's (t, losses), concatenated in rank order (the same on every rank), as
    improved-diffusion's update_with_local_losses; as they are without a process group.
    Ranks may hold batches of different sizes (a smaller last batch): each is padded to the
    largest for all_gather, which needs one shape, and cut back after."""
    if not (dist.is_available() and dist.is_initialized()):
        return t, losses
    world = dist.get_world_size()
    size = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    most = max(counts)
    pad = (0, most - t.numel())
    all_t = [torch.empty(most, dtype=t.dtype, device=t.device) for _ in range(world)]
    all_losses = [torch.empty(most, dtype=losses.dtype, device=t.device) for _ in range(world)]
    dist.all_gather(all_t, F.pad(t, pad))
    dist.all_gather(all_losses, F.pad(losses, pad))
    cut = zip(all_t, all_losses, counts, strict=True)
    pieces = [(a[:n], b[:n]) for a, b, n in cut]
    return torch.cat([a for a, _ in pieces]), torch.cat([b for _, b in pieces])
