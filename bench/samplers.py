"""Which sampler gives a digits checkpoint its best images per second: readability and time.

    python -m bench.samplers runs/quickstart/<date>/checkpoints/last.ckpt
    python -m bench.samplers CKPT --guidance 2 --n 64 --precision 32 bf16

For each sampler setting (DDPM with σ² = β̃ at 100 and 50 steps, DDIM 50, DPM-Solver++(2M) 20
and 10 unless --configs says otherwise) and each precision, draws the same n images (seed 0, one
digit per column for a conditional model, guidance w) and scores them with bench.readability:
how many a real-MNIST classifier reads with p > 0.9 as the digit asked for, the weakest digit,
the mean background, and seconds for the n images. bf16 runs the network under
`torch.autocast("cpu", torch.bfloat16)`, as the training callbacks do under bf16-mixed.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.readability import readability
from ddpm.generate import generate_all
from ddpm.module import load_module

CONFIGS = ["ddpm:100", "ddpm:50", "ddim:50", "dpmpp_2m:20", "dpmpp_2m:10"]


def measure(module, name: str, steps: int, n: int, guidance: float, bf16: bool) -> dict:
    labels = [k % module.num_classes for k in range(n)] if module.num_classes else None
    options = {"variance": "small"} if name == "ddpm" else {}
    start = time.perf_counter()
    images = generate_all(
        module,
        n,
        sampler={"sampler": name, "steps": steps, **options},
        labels=labels,
        guidance=guidance,
        context=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        progress=False,
    )
    seconds = time.perf_counter() - start
    report = readability(
        ((images.float() + 1) / 2).clamp(0, 1),
        labels=None if labels is None else torch.tensor(labels),
    )
    return {"seconds": seconds, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="sampler:steps ...")
    parser.add_argument("--precision", nargs="*", default=["bf16", "32"], choices=["bf16", "32"])
    args = parser.parse_args()
    torch.manual_seed(0)
    module = load_module(args.ckpt)
    guidance = args.guidance
    if guidance is None:
        guidance = float(module.sampling.get("guidance", 0.0) or 0.0)
    key = "readable_as_label" if module.num_classes else "readable"
    print(f"{args.ckpt}: {args.n} images, guidance w = {guidance}")
    print(
        "| sampler | steps | precision | read as asked (p > 0.9) | weakest digit | "
        "background | seconds | readable per second |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for precision in args.precision:
        for config in args.configs:
            name, steps = config.split(":")
            r = measure(module, name, int(steps), args.n, guidance, precision == "bf16")
            per = [v for v in r.get("per_digit_as_label", []) if v is not None]
            weakest = f"{100 * min(per):.0f}%" if per else "-"
            print(
                f"| {name} | {steps} | {precision} | {r[key]}/{r['n']} | {weakest} | "
                f"{r['background']:.3f} | {r['seconds']:.1f} | {r[key] / r['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
