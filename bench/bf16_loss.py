"""Does bf16 autocast train as well as fp32? The quickstart's model on real digits, side by side.

    python -m bench.bf16_loss     # 300 steps each: fp32 seed 0, bf16 seed 0, fp32 seed 1

Trains the quickstart's DiffusionModule (its network, optimizer, warm-up and loss weighting,
from conf/) on mnist5k with the same batches and noise, once in fp32 and once under
`torch.autocast("cpu", torch.bfloat16)` (what `trainer.precision=bf16-mixed` does), and once more
in fp32 with another seed: the seed-to-seed difference is the noise that the bf16-vs-fp32
difference is compared with. Prints the mean training loss per window of steps for each run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from ddpm.data.loaders import load_mnist5k
from ddpm.module import DiffusionModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def quickstart_module() -> DiffusionModule:
    """The quickstart's module as train.py composes it."""
    with hydra.initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hydra.compose("config", overrides=["hydra.run.dir=/tmp/unused"])
    return hydra.utils.instantiate(OmegaConf.to_container(cfg.module, resolve=True))


def losses(steps: int, seed: int, bf16: bool) -> tuple[list[float], float]:
    """Per-step training losses of `steps` steps, and seconds per step."""
    torch.manual_seed(seed)
    module = quickstart_module().train()
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    data = load_mnist5k()
    x = data.images.float() / 127.5 - 1
    batches = torch.Generator().manual_seed(seed)
    out = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.loss_fn(x[idx], data.labels[idx]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        module.ema.step(module.net, step + 1)
        out.append(loss.item())
    return out, (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    runs = {
        "fp32 seed 0": losses(args.steps, 0, bf16=False),
        "bf16 seed 0": losses(args.steps, 0, bf16=True),
        "fp32 seed 1": losses(args.steps, 1, bf16=False),
    }
    w = args.window
    print("| steps | " + " | ".join(runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for a in range(0, args.steps, w):
        means = [sum(r[0][a : a + w]) / len(r[0][a : a + w]) for r in runs.values()]
        cells = " | ".join(f"{m:.4f}" for m in means)
        print(f"| {a + 1}-{min(a + w, args.steps)} | {cells} |")
    last = {k: sum(r[0][-w:]) / w for k, r in runs.items()}
    precision_gap = abs(last["bf16 seed 0"] - last["fp32 seed 0"])
    seed_gap = abs(last["fp32 seed 1"] - last["fp32 seed 0"])
    print(
        f"last {w} steps: |bf16 - fp32| = {precision_gap:.4f}, |seed 1 - seed 0| = {seed_gap:.4f}; "
        + ", ".join(f"{k}: {1000 * r[1]:.0f} ms/step" for k, r in runs.items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps({k: r[0] for k, r in runs.items()}) + "\n")


if __name__ == "__main__":
    main()
