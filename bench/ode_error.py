"""How far each deterministic sampler lands from the exact end of the probability-flow ODE.

    python -m bench.ode_error                 # linear and cosine, T = 1000, 10..200 steps
    python -m bench.ode_error --json FILE

Data N(μ, s²I) (2,000 pixels, μ spread over [-0.6, 0.6], s = 0.6) has the exact denoiser
ε*(x_t, t) = σ (x_t - α μ) / (α² s² + σ²), and the ODE from x_T keeps
z = (x_t - α μ) / √(α² s² + σ²) fixed, so its end at σ = 0 is μ + s z. The table is the max
error over the pixels of one x_T, float64, no clipping: DDIM (η = 0), DPM-Solver++(2M) on
uniform and on logSNR-even steps (this project's default), and, when diffusers is installed
(`pip install -e .[bench]`), diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2,
its default timestep spacing) on the same betas.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from ddpm.samplers import sample_ddim, sample_dpmpp_2m
from ddpm.schedule import NoiseSchedule

STEPS = (10, 20, 50, 100, 200)
MU = torch.linspace(-0.6, 0.6, 2000, dtype=torch.float64)
S = 0.6


def exact_eps(schedule: NoiseSchedule):
    a_bar = schedule.alphas_cumprod.double()

    def eps(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The samplers' denoiser: (ε, no learned variance)."""
        a = a_bar[t.long()].reshape(-1, *[1] * (x.ndim - 1))
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a), None

    return eps


def diffusers_dpmpp(schedule: NoiseSchedule, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.double().numpy(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(steps)
    eps, x = exact_eps(schedule), x_T
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, t.reshape(1))[0], t, x).prev_sample
    return x


def errors(name: str) -> dict[str, list[float]]:
    schedule = getattr(NoiseSchedule, name)(1000)
    a_T = schedule.alphas_cumprod.double()[-1]
    x_T = torch.randn(1, MU.numel(), generator=torch.Generator().manual_seed(0)).double()
    end = MU + S * (x_T - a_T.sqrt() * MU) / (a_T * S**2 + 1 - a_T).sqrt()
    eps = exact_eps(schedule)
    runs = {
        "ddim": lambda n: sample_ddim(eps, schedule, x_T, n, clip_x0=False),
        "dpmpp_2m uniform t": lambda n: sample_dpmpp_2m(
            eps, schedule, x_T, n, clip_x0=False, spacing="uniform"
        ),
        "dpmpp_2m logsnr (default)": lambda n: sample_dpmpp_2m(
            eps, schedule, x_T, n, clip_x0=False
        ),
    }
    try:
        import diffusers  # noqa: F401

        runs["diffusers DPM++(2M)"] = lambda n: diffusers_dpmpp(schedule, x_T, n)
    except ImportError:
        pass
    return {
        label: [(run(n) - end).abs().max().item() for n in STEPS] for label, run in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    result = {"steps": list(STEPS), "machine": platform.processor() or platform.machine()}
    for name in ("linear", "cosine"):
        table = errors(name)
        result[name] = table
        print(f"\n{name} schedule, T = 1000: max |x - exact ODE end|")
        print("| sampler | " + " | ".join(str(n) for n in STEPS) + " |")
        print("|---|" + "---|" * len(STEPS))
        for label, values in table.items():
            print(f"| {label} | " + " | ".join(f"{v:.2g}" for v in values) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
