"""The one loop that turns a diffusion model into images.

Image k of a seed starts from its own noise (`ddpm.samplers.image_generators`), and a
class-conditional model draws it with one label rule (`image_labels`), so images
`first..first+n` are the same whatever batches, processes or entry point drew them: the grids of
training, `sample.py`, `eval.py` and the FID callback (one shard per DDP rank) all come from
`generate`. The model of the loop is EDM's seed-batched `generate.py`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from ddpm.objectives import Denoiser
from ddpm.samplers import Callback, get_sampler, image_generators, randn, sampler_label
from ddpm.schedule import NoiseSchedule

Labels = str | Sequence[int] | None


@runtime_checkable
class DiffusionModel(Protocol):
    """What this file's functions use of a model, and nothing else: `ddpm.module.DiffusionModule`
    has it all, and anything else that has it draws images by the same loop."""

    net: nn.Module  # the trained network
    ema: AveragedModel  # its EMA, the network at .ema.module: what images are drawn with
    schedule: NoiseSchedule
    autoencoder: nn.Module | None  # a latent model's; None in pixel space

    @property
    def device(self) -> torch.device:
        """Where the networks' weights are: images are drawn there."""

    @property
    def num_classes(self) -> int | None:
        """K of a class-conditional network (label K is the null label), else None."""

    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> what the network models (the identity in pixel space)."""

    def decode(self, x: Tensor) -> Tensor:
        """What the network models -> images in [-1, 1]."""

    def denoiser(self, net: nn.Module, labels: Tensor | None = None) -> Denoiser:
        """`net` as (x_t, t) -> Prediction(ε, v), conditional on `labels` when given."""

    def guided_denoiser(
        self, net: nn.Module, labels: Tensor | None = None, guidance: float = 0.0
    ) -> Denoiser:
        """`denoiser` with classifier-free guidance w = `guidance`, for a sampler."""


def image_labels(
    labels: Labels, first: int, count: int, num_classes: int | None
) -> list[int] | None:
    """The labels of images first..first+count-1.

    `"auto"`: `"cycle"` for a class-conditional model, none for an unconditional one;
    `"cycle"`: image k gets class k mod K (a grid of K columns shows one class per column);
    a sequence: one label per image of the whole run, indexed by k; None: unconditional.
    """
    if isinstance(labels, str):
        if labels not in ("auto", "cycle"):
            raise ValueError(f"labels must be 'auto', 'cycle', a list or null, got {labels!r}")
        if labels == "auto" and not num_classes:
            return None
        if not num_classes:
            raise ValueError("labels='cycle' needs a class-conditional model")
        return [k % num_classes for k in range(first, first + count)]
    if labels is None:
        return None
    return [int(v) for v in labels[first : first + count]]


def initial_noise(module: DiffusionModel, n: int, seed: int = 0, first: int = 0) -> Tensor:
    """The pure noise x_T (n, C, H, W) that images first..first+n-1 of `seed` start from."""
    net = module.ema.module
    shape = (n, net.in_channels, net.image_size, net.image_size)
    return randn(shape, image_generators(seed, first, n), module.device)


@torch.no_grad()
def first_frame(module: DiffusionModel, n: int, seed: int = 0, first: int = 0) -> Tensor:
    """x_T as an animation's first frame, on the CPU: the noise itself, or for a latent model
    what the decoder makes of it."""
    return module.decode(initial_noise(module, n, seed, first)).float().cpu()


def generate(
    module: DiffusionModel,
    n: int,
    *,
    sampler: Mapping[str, Any],
    seed: int = 0,
    first: int = 0,
    labels: Labels = "auto",
    guidance: float = 0.0,
    batch_size: int | None = None,
    use_ema: bool = True,
    callback: Callback | None = None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = True,
    desc: str | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Images first..first+n-1 of `seed`, in batches of `batch_size`: yields (index of the
    batch's first image, images (B, C, H, W) in [-1, 1] float32 on the module's device).

    `sampler` is `ddpm.samplers.sampler_settings`' dict ({"sampler": name, "steps": ...,
    options}); the EMA weights unless `use_ema` is false. `labels` by `image_labels`' rule;
    guidance w > 0 (`module.guided_denoiser`) needs labels. `callback(i, t, x_t, x0)` sees every
    sampler step of the first batch (animations). Each batch is drawn inside `context()` (e.g.
    the autocast of the run's precision), and the caller's work on it outside. A progress bar
    counts images, advancing at every sampler step.
    """
    if n < 0:
        raise ValueError(f"the number of images must be >= 0, got {n}")
    batch_size = batch_size or max(n, 1)
    options = dict(sampler)
    name, steps = options.pop("sampler"), options.pop("steps", None)
    total_steps = steps or module.schedule.num_timesteps
    net = module.ema.module if use_ema else module.net
    bar = tqdm(
        total=n,
        unit="img",
        desc=desc or sampler_label(sampler, module.schedule.num_timesteps),
        disable=not progress,
        bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}{postfix}]",
    )
    start = time.perf_counter()
    with bar:
        for k in range(first, first + n, batch_size):
            count = min(batch_size, first + n - k)
            labels_k = image_labels(labels, k, count, module.num_classes)
            y = None if labels_k is None else torch.as_tensor(labels_k, device=module.device)

            def step(i: int, t: Tensor, x: Tensor, x0: Tensor, k: int = k, count: int = count):
                bar.update(count / total_steps)
                if callback is not None and k == first:  # frames as images (latents decoded)
                    callback(i, t, module.decode(x), module.decode(x0))

            was_training = net.training
            net.eval()
            try:
                with torch.no_grad(), context():
                    # per-image generators, advanced past x_T: the sampler's noise continues them
                    gens = image_generators(seed, k, count)
                    shape = (count, net.in_channels, net.image_size, net.image_size)
                    x_0 = get_sampler(name)(
                        module.guided_denoiser(net, y, guidance),
                        module.schedule,
                        randn(shape, gens, module.device),
                        steps,
                        generator=gens,
                        callback=step,
                        **options,
                    )
                    x_0 = module.decode(x_0)
            finally:
                net.train(was_training)
            bar.n = k + count - first  # exact, whatever the fractional steps summed to
            bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")
            yield k, x_0.float().clamp(-1, 1)


def generate_all(module: DiffusionModel, n: int, **kwargs: Any) -> Tensor:
    """`generate`'s images, all of them in one tensor (n, C, H, W)."""
    return torch.cat([images for _, images in generate(module, n, **kwargs)])


@torch.no_grad()
def denoised(
    module: DiffusionModel,
    image: Tensor,
    ts: Sequence[int],
    seed: int = 0,
    labels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`image` (1, C, H, W) in [-1, 1] noised to each t of `ts` (q_sample, eq. 4), and the EMA
    model's estimate of x_0 from each (eq. 15): two (len(ts), C, H, W) tensors (for a latent
    model, the image's latent is noised and both are decoded)."""
    device = module.device
    x0 = module.encode(image.to(device)).expand(len(ts), -1, -1, -1)
    t = torch.tensor(list(ts), device=device, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    x_t = module.schedule.q_sample(x0, t, noise)
    y = None if labels is None else labels.to(device).expand(len(ts))
    eps, _ = module.denoiser(module.ema.module, y)(x_t, t)
    x0_hat = module.schedule.predict_x0(x_t, t, eps)
    if module.autoencoder is None:
        return x_t, x0_hat.clamp(-1, 1)
    return module.decode(x_t), module.decode(x0_hat)


def shard(n: int, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """The first image and the count that DDP rank `rank` of `world_size` draws of n images:
    rank r draws [r·n/W, (r+1)·n/W), so together the ranks draw the n of one process."""
    first, last = rank * n // world_size, (rank + 1) * n // world_size
    return first, last - first
