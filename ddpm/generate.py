"""The one loop that turns a diffusion model into images.

Image k of a seed starts from its own noise (`ddpm.samplers.image_generators`), and a
class-conditional model draws it with one label rule (`image_labels`), so images
`first..first+n` are the same whatever batches, processes or entry point drew them: the grids of
training, `sample.py`, `eval.py` and the FID callback (one shard per DDP rank) all come from
`generate`. The model of the loop is EDM's seed-batched `generate.py`.

Every network call of the loop is counted (`Evaluations`): each adds its batch's image count,
so classifier-free guidance (one doubled batch per step) counts 2 per image and step, a
sampler that calls the network twice per step twice: `nfe_per_image` is what the samplers did,
not a formula. With compile=true (or auto, when the job's calls make it pay) the network runs
compiled (`ddpm.compile`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from ddpm.compile import calls_of, check_setting, compiled_forward, worth_compiling
from ddpm.objectives import Denoiser
from ddpm.samplers import Callback, get_sampler, image_generators, randn, sampler_label
from ddpm.schedule import NoiseSchedule

Labels = str | Sequence[int] | None
log = logging.getLogger(__name__)


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


@dataclass
class Evaluations:
    """Network evaluations of a `generate` run, counted as they happen: `evaluations` sums the
    image count of every network call (a guided call on a doubled batch of B counts 2B),
    `calls` the calls, `images` the images drawn."""

    evaluations: int = 0
    calls: int = 0
    images: int = 0
    compiled: bool = False  # whether the network ran compiled (ddpm.compile)

    @property
    def per_image(self) -> float | None:
        """nfe_per_image: network evaluations per image drawn (None before any image)."""
        return self.evaluations / self.images if self.images else None


class Counted:
    """The network as the denoiser calls it, `(x, t[, y]) -> output`, counting every call into
    an `Evaluations`; other attributes (null_label, in_channels ...) are the network's."""

    def __init__(self, forward: Callable[..., Tensor], net: nn.Module, tally: Evaluations):
        self.forward, self.net, self.tally = forward, net, tally

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.tally.evaluations += x.shape[0]
        self.tally.calls += 1
        return self.forward(x, t) if y is None else self.forward(x, t, y)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.net, name)


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
    compile: str | bool = "false",  # the option's name: compile=auto|true|false
    freezing: bool = True,
    evaluations: Evaluations | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Images first..first+n-1 of `seed`, in batches of `batch_size`: yields (index of the
    batch's first image, images (B, C, H, W) in [-1, 1] float32 on the module's device).

    `sampler` is `ddpm.samplers.sampler_settings`' dict ({"sampler": name, "steps": ...,
    options}); the EMA weights unless `use_ema` is false. `labels` by `image_labels`' rule;
    guidance w > 0 (`module.guided_denoiser`) needs labels. `callback(i, t, x_t, x0)` sees every
    sampler step of the first batch (animations). Each batch is drawn inside `context()` (e.g.
    the autocast of the run's precision), the caller's work on it outside; a progress bar counts
    images. `compile` auto | true | false: the network compiled (`ddpm.compile`; `freezing`
    false for weights that change later); calls counted into `evaluations` (`.per_image`).
    """
    if n < 0:
        raise ValueError(f"the number of images must be >= 0, got {n}")
    batch_size = batch_size or max(n, 1)
    options = dict(sampler)
    name, steps = options.pop("sampler"), options.pop("steps", None)
    total_steps = steps or module.schedule.num_timesteps
    net = module.ema.module if use_ema else module.net
    tally = evaluations if evaluations is not None else Evaluations()
    job = _Job(module, net, sampler, seed, first, labels, guidance, context)
    forward = _forward(job, n, batch_size, check_setting(compile), freezing, tally)
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
            y = job.labels_of(k, count)

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
                    x_0 = get_sampler(name)(
                        module.guided_denoiser(Counted(forward, net, tally), y, guidance),
                        module.schedule,
                        randn(job.shape(count), gens, module.device),
                        steps,
                        generator=gens,
                        callback=step,
                        **options,
                    )
                    x_0 = module.decode(x_0)
            finally:
                net.train(was_training)
            tally.images += count
            bar.n = k + count - first  # exact, whatever the fractional steps summed to
            bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")
            yield k, x_0.float().clamp(-1, 1)


@dataclass
class _Job:
    """What `generate` draws with: enough to run one batch of it again (`_forward`'s probe)."""

    module: DiffusionModel
    net: nn.Module
    sampler: Mapping[str, Any]
    seed: int
    first: int
    labels: Labels
    guidance: float
    context: Callable[[], contextlib.AbstractContextManager]

    def labels_of(self, k: int, count: int) -> Tensor | None:
        labels_k = image_labels(self.labels, k, count, self.module.num_classes)
        return None if labels_k is None else torch.as_tensor(labels_k, device=self.module.device)

    def shape(self, count: int) -> tuple[int, int, int, int]:
        return (count, self.net.in_channels, self.net.image_size, self.net.image_size)


def _forward(
    job: _Job, n: int, batch_size: int, setting: str, freezing: bool, tally: Evaluations
) -> Callable[..., Tensor]:
    """The network call of the job: eager, or compiled for compile=true, or for compile=auto
    when `ddpm.compile.worth_compiling` says the job's calls pay for the compile time."""
    if setting == "false" or n == 0:
        return job.net
    if setting == "auto":
        calls_per_batch, seconds = _probe(job, min(batch_size, n))
        calls = calls_of(n, batch_size, calls_per_batch)
        worth, why = worth_compiling(job.net, job.module.device, calls, seconds, freezing)
        log.info("compile=auto: %s, since %s", "compiling" if worth else "eager", why)
        if not worth:
            return job.net
    tally.compiled = True
    return compiled_forward(job.net, job.module.device, freezing=freezing)


@torch.no_grad()
def _probe(job: _Job, count: int) -> tuple[int, float]:
    """compile=auto's two figures for a batch of `count` images: the network calls the sampler
    makes (counted on a network that returns zeros, the sampler's arithmetic only), and the
    seconds of one eager call (timed after a warm-up call)."""
    module, net = job.module, job.net
    y = job.labels_of(job.first, count)
    x = randn(job.shape(count), image_generators(job.seed, job.first, count), module.device)
    t = torch.full((count,), module.schedule.num_timesteps - 1, device=module.device)
    outputs: list[Tensor] = []

    def timed(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        outputs.append(net(x, t) if y is None else net(x, t, y))
        return outputs[-1]

    was_training = net.training
    net.eval()
    try:
        with job.context():
            denoiser = module.guided_denoiser(Counted(timed, net, Evaluations()), y, job.guidance)
            denoiser(x, t)  # warm-up: oneDNN primitives, allocations
            start = time.perf_counter()
            denoiser(x, t)
            seconds = time.perf_counter() - start
    finally:
        net.train(was_training)
    channels = outputs[-1].shape[1]

    def zeros(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return x.new_zeros((x.shape[0], channels, *x.shape[2:]))

    tally = Evaluations()
    options = dict(job.sampler)
    name, steps = options.pop("sampler"), options.pop("steps", None)
    gens = image_generators(job.seed, job.first, 1)
    get_sampler(name)(
        module.guided_denoiser(
            Counted(zeros, net, tally), None if y is None else y[:1], job.guidance
        ),
        module.schedule,
        randn(job.shape(1), gens, module.device),
        steps,
        generator=gens,
        **options,
    )
    return tally.calls, seconds


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
