"""How much improved-diffusion's loss-second-moment sampling of t lowers the variance of the
one-sample L_vlb estimate (Nichol & Dhariwal 2021, Sec. 3.3), on real digits, measured exactly.

    python -m bench.resample_variance                 # 600 steps, T = 1000, on the CPU
    python -m bench.resample_variance --json FILE

1. Trains a small learned-variance UNet on mnist5k as iddpm_cifar10_vlb trains (module.loss=vlb,
   module.timestep_sampler=loss_second_moment, cosine schedule), for --steps steps of 32.
2. Takes every term L_t (t = 0..T-1, `bpd_exact`'s terms, learned variance, x̂_0 unclipped as
   in training) of 2 x 16 training digits at one ε each: the first 16 ("fit") give
   p(t) = (1 - u) √mean L_t² / Σ + u / T, the rule with its full history; the other 16 are
   where the variances are computed, so p is not fitted to the very images it is scored on.
3. Per image, the estimate of Σ_t L_t from one t: T L_t with t ~ U has variance
   V_U = T Σ_t L_t² - (Σ_t L_t)²; L_t / p(t) with t ~ p has V_p = Σ_t L_t² / p(t) - (Σ_t L_t)².
   Exact sums over all T terms, no sampling. Reported: the mean of each over the images, their
   ratio, and the same for the sampler's own p(t) at the end of training (its 10-loss history).

Hand-written bench (no library measures this); the numbers depend on the model and data, so
they show the size of the effect, not iDDPM's CIFAR-10 figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ddpm.data.loaders import load_mnist5k
from ddpm.likelihood import bpd_exact
from ddpm.module import DiffusionModule
from ddpm.resample import UNIFORM_PROB

NET = {
    "_target_": "ddpm.unet.UNet",
    "image_size": 28,
    "in_channels": 1,
    "ch": 16,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
OPT = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.0}


def train(steps: int, T: int, batch: int, seed: int) -> tuple[DiffusionModule, torch.Tensor]:
    """The module after `steps` steps of L_vlb with loss-second-moment t, and the digits."""
    torch.manual_seed(seed)
    module = DiffusionModule(
        net=NET,
        schedule={"_target_": "ddpm.schedule.NoiseSchedule.cosine", "timesteps": T},
        optimizer=OPT,
        learn_sigma=True,
        loss="vlb",
        timestep_sampler="loss_second_moment",
        cond_drop_prob=0.0,
    )
    images = load_mnist5k().images.float() / 127.5 - 1  # (5000, 1, 28, 28) in [-1, 1]
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    for step in range(steps):
        index = torch.randint(0, len(images), (batch,))
        loss = module.loss_fn(images[index], None).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            warm = bool(module.timestep_sampler.warmed_up())
            print(f"step {step + 1}: loss {loss.item():.4g}, sampler warmed up: {warm}")
    return module.eval(), images


def variances(terms: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """Mean over images of V_U and V_p for terms (B, T) and p (T,), float64."""
    T = terms.shape[1]
    total = terms.sum(1)
    v_uniform = T * terms.square().sum(1) - total.square()
    v_p = (terms.square() / p).sum(1) - total.square()
    return v_uniform.mean().item(), v_p.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.time()
    module, images = train(args.steps, args.timesteps, args.batch, args.seed)
    T = args.timesteps
    g = torch.Generator().manual_seed(args.seed + 1)
    chosen = images[torch.randperm(len(images), generator=g)[:32]]
    denoiser = module.denoiser(module.net)
    with torch.no_grad():
        terms = bpd_exact(denoiser, module.schedule, chosen, "learned", generator=g, clip_x0=False)[
            "terms"
        ]  # (32, T) bits/dim
    fit, scored = terms[:16], terms[16:]
    rms = fit.square().mean(0).sqrt()
    p_rule = (1 - UNIFORM_PROB) * rms / rms.sum() + UNIFORM_PROB / T
    p_own = module.timestep_sampler.probabilities().double()
    v_u, v_rule = variances(scored, p_rule)
    second = scored.square().mean(0)  # mean L_t² over the scored images (T,)
    _, v_own = variances(scored, p_own)
    result = {
        "steps": args.steps,
        "timesteps": T,
        "batch": args.batch,
        "sampler_warmed_up": bool(module.timestep_sampler.warmed_up()),
        "bound_mean_bits_per_dim": scored.sum(1).mean().item(),
        "var_uniform": v_u,
        "var_p_rule_on_16_other_images": v_rule,
        "var_p_sampler_history": v_own,
        "reduction_rule": v_u / v_rule,
        "reduction_sampler": v_u / v_own,
        "share_of_L_t_squared_in_first_1pct_of_t": (
            scored[:, : max(1, T // 100)].square().sum() / scored.square().sum()
        ).item(),
        # where the second moment sits: the t of the largest mean L_t², and their shares
        "largest_second_moments": [
            {"t": int(t), "share": round(float(m / second.sum()), 4), "p_rule": float(p_rule[t])}
            for m, t in zip(*second.topk(5), strict=True)
        ],
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "wall_s": round(time.time() - start, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
