"""Lightning callbacks that write what a person looks at: sample grids and animations, the loss
curve, and FID / KID / IS during training."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from ddpm.compile import check_setting
from ddpm.generate import Evaluations, first_frame, generate, generate_all, shard
from ddpm.images import Recorder, save_animation, save_grid, to_pil
from ddpm.metrics.fid import InceptionMetrics, check_count, measure
from ddpm.metrics.inception import inception_weights
from ddpm.metrics.reference import prepare_reference, reference_subset, stats_key
from ddpm.samplers import dry_run, sampler_label, sampler_settings


def check_sampler(module: L.LightningModule, settings: dict) -> None:
    """The option values of a sampler setting, by `ddpm.samplers.dry_run` on the module's
    schedule, so that a wrong one fails at the start of training, not at its first grid."""
    if hasattr(module, "schedule"):  # a diffusion model (not the autoencoder's first stage)
        learned = bool(getattr(module.hparams, "learn_sigma", False))
        dry_run(settings, module.schedule, learned)


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
        nrow = module.num_classes or int(self.n**0.5)  # one class per column
        recorder = Recorder(steps or module.schedule.num_timesteps) if animate else None
        images = generate_all(
            module,
            self.n,
            sampler={**self.sampler, "steps": steps},
            seed=self.seed,
            guidance=self.guidance if module.num_classes else 0.0,
            callback=recorder,
            # in the run's precision: under bf16-mixed the grid is drawn 2.3x faster on a CPU
            # with native bf16, and reads as well as in fp32 (bench/samplers.py)
            context=trainer.precision_plugin.forward_context,
            progress=_progress(trainer),
            desc=f"grid {name}",
        )
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
        x_T = first_frame(module, self.n, self.seed)
        save_animation(recorder, path, lambda images: to_pil(images, nrow), x_T)
        for logger in trainer.loggers:
            if hasattr(logger, "log_video"):  # W&B
                logger.log_video("denoising", [str(path)], step=trainer.global_step)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for steps in {self.steps, self.final_steps}:  # a wrong option fails before step 1
            check_sampler(module, {**self.sampler, "steps": steps})
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


class ReconstructionGrid(L.Callback):
    """An autoencoder's reconstructions of the first `n` validation images, at each validation
    (`samples/recon_step_XXXXXXX.png`) and at the end (`samples/recon_final.png`): the images in
    the top rows, their reconstructions (from the posterior mean) in the rows below."""

    def __init__(self, n: int = 32) -> None:
        if n < 1:
            raise ValueError(f"callbacks.reconstruction_grid.n must be >= 1, got {n}")
        self.n = n

    @torch.no_grad()
    def _draw(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> None:
        datamodule = trainer.datamodule
        images = datamodule.val_set.images[: self.n].to(module.device).float() / 127.5 - 1
        with trainer.precision_plugin.forward_context():
            recon, _ = module(images, sample=False)
        nrow = min(8, len(images))  # n = 32: four rows of images, four of reconstructions
        both = torch.cat([images, recon.float().clamp(-1, 1)])
        save_grid(both.cpu(), Path(trainer.default_root_dir) / "samples" / f"{name}.png", nrow)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._draw(trainer, module, f"recon_step_{trainer.global_step:07d}")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._draw(trainer, module, "recon_final")


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
            # Lightning passes {} for a step without a loss: no point. A skipped update
            # (module.nonfinite=skip) has a non-finite loss: NaN, a gap in the plotted line,
            # so the curve shows where the updates were dropped
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if not isinstance(loss, torch.Tensor):
                return
            value = float(loss.detach())  # one device sync every N steps
            self.steps.append(step)
            self.losses.append(value if math.isfinite(value) else math.nan)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.losses = list(state["steps"]), list(state["losses"])

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.steps:
            return
        fig = Figure(figsize=(6, 4))  # no pyplot: no backend, no display, no global state
        ax = fig.subplots()
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


class FID(L.Callback):
    """FID (and optionally KID and Inception Score) of `n` EMA samples at every
    `every_n_validations`-th validation, logged as e.g. `val/fid10k_train_ddim50`,
    `val/kid10k_train_ddim50`, `val/is10k_ddim50` (so ModelCheckpoint can monitor them), and
    the network evaluations per image the samples cost as `val/nfe_per_image_ddim50`, with
    generation sharded over DDP ranks (`ddpm.generate.shard`; the values equal a single
    process's). `compile` auto | true | false: the EMA network compiled for the sampling
    (`ddpm.compile`, without freezing: its weights change between validations).

    The reference statistics come from the datamodule's `reference_split` (papers: CIFAR-10's
    50k training images), cached on disk by `ddpm.reference.cached_reference`.
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
        cache_dir: str | None = None,
        every_n_validations: int = 1,
        kid: bool = False,
        inception_score: bool = False,
        compile: str | bool = "auto",  # the option's name
    ) -> None:
        check_count(n, features)
        self.compile = check_setting(compile, "callbacks.fid.compile")
        self.sampler = sampler_settings(sampler, steps, default="ddim")
        self.n, self.guidance, self.features, self.weights = n, guidance, features, weights
        self.reference_split, self.reference_n = reference_split, reference_n
        self.batch_size, self.seed, self.cache_dir = batch_size, seed, cache_dir
        self.every = max(1, every_n_validations)
        self.kid, self.inception_score = kid, inception_score
        self.metrics = None
        self._validations = 0

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        check_sampler(module, self.sampler)  # a wrong option fails before step 1

    def _build(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_rank == 0:  # converts weights once, before the others read them
            inception_weights(self.weights, self.cache_dir)
        trainer.strategy.barrier()
        weights = inception_weights(self.weights, self.cache_dir)
        self.metrics = InceptionMetrics(
            weights, module.device, self.features, self.kid, self.inception_score
        )
        dm = trainer.datamodule
        # the statistics are keyed by the images' content: read even on a cache hit
        reference = reference_subset(dm.load(self.reference_split).images, self.reference_n)
        check_count(len(reference), self.features)
        key = stats_key(
            dm.name, self.reference_split, reference, weights, self.features, self.cache_dir
        )
        prepare_reference(
            self.metrics,
            key,
            lambda: reference.split(self.batch_size),
            self.cache_dir,
            trainer.global_rank,
        )

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        self._measure(trainer, module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """train.py test=true: the same measures against the test split (test/fid..._test)."""
        split = getattr(trainer.datamodule, "test_split", None) or self.reference_split
        if split != self.reference_split:
            self.reference_split, self.metrics = split, None  # its statistics instead
        self._measure(trainer, module, "test")

    def _measure(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self.metrics is None:
            self._build(trainer, module)
        first, count = shard(self.n, trainer.global_rank, trainer.world_size)
        tally = Evaluations()
        batches = generate(
            module,
            count,
            sampler=self.sampler,
            seed=self.seed,
            first=first,
            guidance=self.guidance if module.num_classes else 0.0,
            batch_size=self.batch_size,
            progress=_progress(trainer),
            desc=f"FID samples (rank {trainer.global_rank})",
            compile=self.compile,
            freezing=False,  # the EMA weights change between validations
            evaluations=tally,
        )
        label = sampler_label(self.sampler, module.schedule.num_timesteps)
        values = measure(
            self.metrics, (images for _, images in batches), self.n, self.reference_split, label
        )
        for name, value in values.items():  # already the same on every rank
            module.log(f"{stage}/{name}", value, rank_zero_only=False)
        if tally.images:  # every rank draws with the same sampler: the same figure
            module.log(f"{stage}/nfe_per_image_{label}", tally.per_image, rank_zero_only=False)


def _progress(trainer: L.Trainer) -> bool:
    """Progress bars for generation inside training when the run shows its own."""
    return trainer.progress_bar_callback is not None and trainer.is_global_zero
