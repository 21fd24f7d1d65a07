"""Callbacks that write what a person looks at: sample grids and the loss curve."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from ddpm.samplers import sampler_settings


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 [0, 255], rounding as image files store them."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_png(image: Tensor, path: str | Path) -> None:
    """Write one uint8 image (C, H, W), C = 1 or 3, as a PNG."""
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    # the grid holds exactly the pixels that the per-image PNGs of sample.py hold
    grid = make_grid(to_uint8(images.cpu()), nrow=nrow, padding=2)
    save_png(grid[:1] if images.shape[1] == 1 else grid, path)  # make_grid turns gray into RGB
    return path


def cycle_labels(n: int, num_classes: int) -> list[int]:
    """Labels 0, 1, ..., K - 1, 0, 1, ... for n images: a grid with one class per column."""
    return [k % num_classes for k in range(n)]


class SampleGrid(L.Callback):
    """At each validation and at the end of training, draws a fixed-seed grid with the EMA weights.

    Writes `<run>/samples/step_XXXXXXX.png` and `<run>/samples/final.png`, and sends the grid to
    loggers that take images (TensorBoard, W&B). A class-conditional model draws image k with
    label k mod num_classes (one class per column) at classifier-free guidance `guidance`.
    """

    def __init__(
        self,
        n: int = 64,
        sampler: dict | None = None,
        steps: int | None = None,
        final_steps: int | None = None,
        seed: int = 0,
        guidance: float = 0.0,
        on_validation: bool = True,
        animate: bool = False,
    ) -> None:
        if n < 1:
            raise ValueError(f"callbacks.sample_grid.n must be >= 1, got {n}")
        # the sampler config group (name and options); the steps of a grid are set here
        self.sampler = sampler_settings(sampler)
        self.n, self.steps, self.seed, self.guidance = n, steps, seed, guidance
        self.final_steps = final_steps or steps
        self.on_validation = on_validation
        self.animate = animate  # the final grid's denoising as samples/final.gif, also to W&B
        self._last: tuple[int, int | None, Path] | None = None  # (step, steps, path) of last grid

    def _draw(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        steps: int | None,
        name: str,
        animate: bool = False,
    ):
        from ddpm.render import Recorder

        labels, guidance, nrow = None, 0.0, int(self.n**0.5)
        if module.num_classes:
            labels, guidance, nrow = (
                cycle_labels(self.n, module.num_classes),
                self.guidance,
                module.num_classes,
            )
        recorder = Recorder(steps or module.schedule.num_timesteps) if animate else None
        # in the run's precision: under bf16-mixed the grid is drawn 2.3x faster on a CPU with
        # native bf16, and reads as well as in fp32 (bench/samplers.py)
        with trainer.precision_plugin.forward_context():
            images = module.generate(
                self.n,
                seed=self.seed,
                labels=labels,
                guidance=guidance,
                callback=recorder,
                **{**self.sampler, "steps": steps},
            ).float()
        path = save_grid(images, Path(trainer.default_root_dir) / "samples" / f"{name}.png", nrow)
        if recorder is not None:
            self._animation(trainer, module, recorder, path.with_suffix(".gif"), nrow)
        grid = make_grid(images.float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("samples", grid, trainer.global_step)
            elif hasattr(logger, "log_image"):  # W&B
                logger.log_image("samples", [grid], step=trainer.global_step)
        self._last = (trainer.global_step, steps, path)
        return path

    def _animation(self, trainer, module, recorder, path: Path, nrow: int) -> None:
        from ddpm.render import save_animation, to_pil

        x_T = module.initial_noise(self.n, self.seed).cpu()
        save_animation(recorder, path, lambda images: to_pil(images, nrow), x_T)
        for logger in trainer.loggers:
            if hasattr(logger, "log_video"):  # W&B
                logger.log_video("denoising", [str(path)], step=trainer.global_step)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # the settings of the final grid travel in every checkpoint: sample.py's defaults
        guidance = self.guidance if module.num_classes else 0.0
        module.sampling = {**self.sampler, "steps": self.final_steps, "guidance": guidance}

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._draw(trainer, module, self.steps, f"step_{trainer.global_step:07d}")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        final = Path(trainer.default_root_dir) / "samples" / "final.png"
        same = self._last is not None and self._last[:2] == (trainer.global_step, self.final_steps)
        if same and not self.animate:
            # the last validation drew this very grid (same weights, seed and steps)
            shutil.copyfile(self._last[2], final)
        else:
            self._draw(trainer, module, self.final_steps, "final", animate=self.animate)


class LossCurve(L.Callback):
    """Records the training loss every `every_n_steps` steps and plots it to `<run>/loss_curve.png`.

    The history is part of the callback's checkpoint state, so a resumed run plots all of it.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.steps: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, i: int):
        step = trainer.global_step
        if step % self.every_n_steps == 0 and (not self.steps or self.steps[-1] != step):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.steps.append(step)
            self.losses.append(float(loss.detach()))  # one device sync every N steps

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.losses = list(state["steps"]), list(state["losses"])

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.steps:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.steps, self.losses, lw=0.8, alpha=0.5, label="loss")
        k = max(1, len(self.losses) // 20)
        if len(self.losses) > k:
            smooth = torch.tensor(self.losses).unfold(0, k, 1).mean(1).tolist()
            ax.plot(self.steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
        ax.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
        ax.legend()
        fig.tight_layout()
        path = Path(trainer.default_root_dir) / "loss_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)


class FID(L.Callback):
    """FID (and optionally KID and Inception Score) of `n` EMA samples at every
    `every_n_validations`-th validation, logged as e.g. `val/fid10k_train_ddim50`,
    `val/kid10k_train_ddim50`, `val/is10k_ddim50` (so ModelCheckpoint can monitor them), with
    generation sharded over DDP ranks (`ddpm.metrics.sharded_metrics`: the values equal a
    single process's).

    The reference statistics come from the datamodule's `reference_split` (papers: CIFAR-10's
    50k training images), cached on disk by `ddpm.metrics.cached_reference`.
    """

    def __init__(
        self,
        n: int = 10_000,
        sampler: dict | None = None,
        steps: int | None = 50,
        guidance: float = 0.0,
        features: int = 2048,
        weights: str | None = None,
        reference_split: str = "train",
        reference_n: int | None = None,
        batch_size: int = 250,
        seed: int = 0,
        cache_dir: str = ".cache/ddpm",
        every_n_validations: int = 1,
        kid: bool = False,
        inception_score: bool = False,
    ) -> None:
        from ddpm.metrics import check_count, metric_name

        check_count(n, features)
        self.sampler = sampler_settings(sampler, steps, default="ddim")
        self.n, self.guidance, self.features, self.weights = n, guidance, features, weights
        self.reference_split, self.reference_n = reference_split, reference_n
        self.batch_size, self.seed, self.cache_dir = batch_size, seed, cache_dir
        self.every = max(1, every_n_validations)
        self.kid, self.inception_score = kid, inception_score
        self.label = f"{self.sampler['sampler']}{self.sampler['steps'] or 'all'}"
        self.name = "val/" + metric_name(n, reference_split, self.label)
        self.metrics = None
        self._validations = 0

    def _build(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from ddpm.metrics import (
            InceptionMetrics,
            check_count,
            inception_weights,
            prepare_reference,
            reference_subset,
            stats_key,
        )

        if trainer.global_rank == 0:  # converts weights once, before the others read them
            inception_weights(self.weights, self.cache_dir)
        trainer.strategy.barrier()
        weights = inception_weights(self.weights, self.cache_dir)
        self.metrics = InceptionMetrics(
            weights, module.device, self.features, self.kid, self.inception_score
        )
        dm = trainer.datamodule
        loaded: dict[str, Tensor] = {}

        def images() -> Tensor:
            if "x" not in loaded:
                loaded["x"] = reference_subset(
                    dm.load(self.reference_split).images, self.reference_n
                )
            return loaded["x"]

        count = self.reference_n or len(images())
        check_count(count, self.features)
        key = stats_key(dm.name, self.reference_split, dm.image_size, count, weights, self.features)
        prepare_reference(
            self.metrics,
            key,
            lambda: images().split(self.batch_size),
            self.cache_dir,
            trainer.global_rank,
        )

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from ddpm.metrics import sharded_metrics

        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        if self.metrics is None:
            self._build(trainer, module)
        values = sharded_metrics(
            self.metrics,
            module,
            self.n,
            self.reference_split,
            trainer.global_rank,
            trainer.world_size,
            batch_size=self.batch_size,
            seed=self.seed,
            guidance=self.guidance,
            label=self.label,
            **self.sampler,
        )
        for name, value in values.items():  # already the same on every rank
            module.log(f"val/{name}", value, rank_zero_only=False)
