"""Is `val/bpd` each image's own bound? The two-call estimate against the exact bound, per image.

    python -m bench.bpd_estimator                     # 1,500 draws, linear T = 1000
    python -m bench.bpd_estimator --draws 300 --json FILE

Data: scikit-learn's 1,797 8x8 digits on the 256 levels of [-1, 1]. Denoiser: the exact ε* of
the Gaussian N(μ, Σ) fitted to them (full covariance), a linear Wiener filter and the best
Gaussian model of the digits:  ε*(x_t, t) = σ U diag(1 / (ᾱλ + σ²)) Uᵀ (x_t - √ᾱ μ),
Σ = U diag(λ) Uᵀ, σ² = 1 - ᾱ; linear T = 1000, σ_t² = β_t.
Batch "mixed": 4 different images (two digits, a blank page, uniform noise), bounds far apart;
batch "digits": 16 digits, a validation batch. Each image's bound: `bpd_exact` (T network calls;
one ε per term) averaged over `--replicas` ε draws, ± its standard error. Then the mean ± standard
error of `bpd_estimate` over the draws with the batch in fixed order and reversed, z = (mean -
bound) / both standard errors, the standard deviation of one image's draw and of the batch mean
(what `val/bpd` logs). Both t-draws of `bpd_estimate` are measured: `stratified` (a random
permutation of B strata) and independent; the code before the fix has only its own.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform

import torch
from sklearn.datasets import load_digits

from ddpm.likelihood import bpd_estimate, bpd_exact
from ddpm.schedule import NoiseSchedule


def gaussian_of_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(digits (N, 1, 8, 8) on the 256 levels of [-1, 1], μ (64,), U (64, 64), λ (64,))."""
    pixels = torch.as_tensor(load_digits().images, dtype=torch.float64)  # 0..16
    levels = torch.round(pixels / 16 * 255) / 127.5 - 1
    flat = levels.flatten(1)
    mu = flat.mean(0)
    cov = torch.cov(flat.T) + 1e-4 * torch.eye(64, dtype=torch.float64)  # ridge: 4 corner
    lam, u = torch.linalg.eigh(cov)  # pixels are constant in every digit
    return levels.unsqueeze(1), mu, u, lam


def wiener_denoiser(schedule: NoiseSchedule, mu, u, lam):
    a_bar = schedule.alphas_cumprod.double()  # a model: its own rounding is no matter

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        a = a_bar[t].reshape(-1, 1)
        centred = (x.flatten(1).double() - a.sqrt() * mu) @ u  # (B, 64) in the eigenbasis
        eps = (1 - a).sqrt() * (centred / (a * lam + 1 - a)) @ u.T
        return eps.reshape(x.shape).to(x.dtype), None

    return denoiser


def batches(digits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two batches: mixed (4, 1, 8, 8), digits 0 and 1 of the set, a blank page and uniform
    noise, whose bounds lie far apart; digits (16, 1, 8, 8), a validation batch (100..115)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (1, 1, 8, 8), generator=g).double() / 127.5 - 1
    blank = -torch.ones(1, 1, 8, 8, dtype=torch.float64)
    return {"mixed": torch.cat([digits[:2], blank, noise]), "digits": digits[100:116]}


def exact_bound(denoiser, schedule, x0, replicas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's bound (B,) and its standard error: `bpd_exact` draws one ε per term, so it
    is averaged over `replicas` copies of the batch (independent ε) to be the bound itself."""
    many = x0.repeat(replicas, 1, 1, 1)
    g = torch.Generator().manual_seed(12345)
    bpd = bpd_exact(denoiser, schedule, many, "large", generator=g)["bpd"].reshape(replicas, -1)
    return bpd.mean(0), bpd.std(0) / replicas**0.5


def draws(denoiser, schedule, x0, n: int, **kw) -> torch.Tensor:
    """(n, B) estimates, draw k with the generator seeded k (as validation seeds per batch)."""
    out = [
        bpd_estimate(
            denoiser, schedule, x0, "large", generator=torch.Generator().manual_seed(k), **kw
        )
        for k in range(n)
    ]
    return torch.stack(out)


def measure(x0: torch.Tensor, denoiser, schedule, exact, n: int, kw: dict) -> dict:
    bound, bound_se = exact
    fixed = draws(denoiser, schedule, x0, n, **kw)
    reverse = draws(denoiser, schedule, x0.flip(0), n, **kw).flip(1)
    se = fixed.std(0) / n**0.5
    return {
        "exact": bound.tolist(),
        "exact_se": bound_se.tolist(),
        "mean": fixed.mean(0).tolist(),
        "se": se.tolist(),
        "z": ((fixed.mean(0) - bound) / (se**2 + bound_se**2).sqrt()).tolist(),
        "mean_reversed": reverse.mean(0).tolist(),
        "se_reversed": (reverse.std(0) / n**0.5).tolist(),
        "std_per_image": fixed.std(0).tolist(),
        "batch_exact": bound.mean().item(),
        "batch_mean": fixed.mean(1).mean().item(),
        "batch_se": (fixed.mean(1).std() / n**0.5).item(),
        "batch_std": fixed.mean(1).std().item(),
    }


def report(label: str, r: dict, names: list[str]) -> None:
    print(f"\n{label}")
    print("| image | bound | estimate (fixed order) | z | estimate (reversed) | std of one |")
    print("|---|---|---|---|---|---|")
    for i, name in enumerate(names):
        print(
            f"| {name} | {r['exact'][i]:.2f} ± {r['exact_se'][i]:.2f} "
            f"| {r['mean'][i]:.2f} ± {r['se'][i]:.2f} | {r['z'][i]:+.1f} "
            f"| {r['mean_reversed'][i]:.2f} ± {r['se_reversed'][i]:.2f} "
            f"| {r['std_per_image'][i]:.2f} |"
        )
    print(
        f"| batch mean | {r['batch_exact']:.2f} | {r['batch_mean']:.2f} ± {r['batch_se']:.2f} "
        f"| | | {r['batch_std']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1500)
    parser.add_argument("--replicas", type=int, default=64, help="ε draws of each exact bound")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"draws": args.draws, "machine": platform.processor() or platform.machine()}
    if "stratified" in inspect.signature(bpd_estimate).parameters:
        choices = {"stratified (permuted strata)": {"stratified": True}}
        choices["independent t"] = {"stratified": False}
    else:  # the code before the per-image fix
        choices = {"stratified (strata in batch order)": {}}
    digits, mu, u, lam = gaussian_of_digits()
    schedule = NoiseSchedule.linear(1000)
    denoiser = wiener_denoiser(schedule, mu, u, lam)
    for batch, x0 in batches(digits).items():
        exact = exact_bound(denoiser, schedule, x0, args.replicas)
        names = ["digit 0", "digit 1", "blank", "noise"] if batch == "mixed" else None
        for label, kw in choices.items():
            r = measure(x0, denoiser, schedule, exact, args.draws, kw)
            result[f"{batch}, {label}"] = r
            report(
                f"batch {batch!r}, {label}, {args.draws} draws, bits/dim",
                r,
                names or [f"digit {100 + i}" for i in range(len(x0))],
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
