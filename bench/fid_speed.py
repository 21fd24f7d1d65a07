"""FID of the same two image sets by this project and by torch-fidelity, side by side.

    python -m bench.fid_speed                  # 2 x 400 MNIST digits, 2048-d, 2 rounds
    python -m bench.fid_speed --n 1000 --rounds 3

Both run the same TF-Inception weights (fid-helper's TorchScript file converted into
torch-fidelity's layout, as the tests use) on the same uint8 tensors, in this process, one after
the other and alternating over rounds; the medians are printed, with both FID values (they
must agree to ~1e-5 relative). torch-fidelity reads the images through its Dataset input,
batch 64 (its default); ours through `InceptionMetrics`, in eval.py's batches.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
from torch.utils.data import Dataset

from ddpm.data.loaders import load_mnist5k
from ddpm.metrics.fid import InceptionMetrics
from ddpm.metrics.inception import fid_helper_file, inception_weights


class Tensors(Dataset):
    """uint8 (N, 3, H, W) images as the Dataset input torch-fidelity takes."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def ours(real: torch.Tensor, fake: torch.Tensor, weights: str, batch: int) -> float:
    metrics = InceptionMetrics(weights, "cpu", 2048)
    for chunk in real.split(batch):
        metrics.update(chunk, real=True)
    for chunk in fake.split(batch):
        metrics.update(chunk, real=False)
    return float(metrics.fid.compute())


def fidelity(real: torch.Tensor, fake: torch.Tensor, weights: str, batch: int) -> float:
    import torch_fidelity

    rgb = [Tensors(x.expand(-1, 3, -1, -1).contiguous()) for x in (real, fake)]
    out = torch_fidelity.calculate_metrics(
        input1=rgb[1],
        input2=rgb[0],
        fid=True,
        feature_extractor_weights_path=weights,
        batch_size=batch,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    return float(out["frechet_inception_distance"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="images per set")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100, help="our batch (eval.py's default)")
    parser.add_argument("--fidelity-batch", type=int, default=64, help="torch-fidelity's default")
    args = parser.parse_args()
    digits = load_mnist5k().images
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    real, fake = digits[order[: args.n]], digits[order[args.n : 2 * args.n]]
    with tempfile.TemporaryDirectory() as cache:
        weights = inception_weights(fid_helper_file(), cache)
        times: dict[str, list[float]] = {"ours": [], "torch-fidelity": []}
        values: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, run, batch in (
                ("ours", ours, args.batch),
                ("torch-fidelity", fidelity, args.fidelity_batch),
            ):
                start = time.perf_counter()
                values[name] = run(real, fake, weights, batch)
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    machine = platform.processor() or platform.machine()
    report = {
        "images": f"2 x {args.n} MNIST digits (28 px, gray), 2048-d features",
        "machine": f"{machine}, {torch.get_num_threads()} threads",
        "seconds": times,
        "median_s": median,
        "fid": values,
        "ours_vs_torch_fidelity_speed": median["torch-fidelity"] / median["ours"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
