"""How far each deterministic sampler of a trained model lands from the converged ODE solution.

    python -m bench.solver_distance CKPT [--n 32] [--reference abm] [--ref-steps 200]

The exact-ODE bench (bench/ode_error.py) has a denoiser of known smoothness; a trained network's
x̂_0 is rougher (and clipped to [-1, 1]). This draws the same `n` images (seed 0) with each
sampler at 5-50 steps and prints the RMS distance, in [-1, 1] pixel units, to the same images
drawn with `--reference` at `--ref-steps` steps, and how far two different 200-step solvers
are from each other (the floor under which the ranking means nothing).
"""

from __future__ import annotations

import argparse

import torch

from ddpm.generate import generate
from ddpm.module import load_module

SAMPLERS = (
    ("ddim", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    *(("abm", {"order": k}) for k in (2, 3, 4)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--reference", default="abm")
    parser.add_argument("--ref-steps", type=int, default=200)
    args = parser.parse_args()
    module = load_module(args.ckpt)

    def draw(name: str, steps: int, **options) -> torch.Tensor:
        setting = {"sampler": name, "steps": steps, **options}
        batches = generate(
            module, args.n, sampler=setting, seed=0, batch_size=args.n, progress=False
        )
        return torch.cat([x for _, x in batches]).double()

    def rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).pow(2).mean().sqrt().item()

    reference = draw(args.reference, args.ref_steps)
    other = "dpmpp_3m" if args.reference != "dpmpp_3m" else "abm"
    floor = rms(reference, draw(other, args.ref_steps))
    print(
        f"RMS distance to {args.reference} at {args.ref_steps} steps ({other} there: {floor:.4f})"
    )
    labels = [name + (f" order {o['order']}" if o else "") for name, o in SAMPLERS]
    print("| steps | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for steps in (5, 10, 15, 20, 30, 50):
        row = [rms(draw(name, steps, **options), reference) for name, options in SAMPLERS]
        print(f"| {steps} | " + " | ".join(f"{v:.4f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
