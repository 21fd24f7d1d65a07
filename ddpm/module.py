"""DiffusionModule: the training objective (its math in `ddpm.objectives`), EMA weights and
optimizer; `load_module` rebuilds one from a checkpoint. Images are drawn from it by
`ddpm.generate`."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim.lr_scheduler import ConstantLR
from torch.optim.swa_utils import AveragedModel
from torchmetrics import MeanMetric

from ddpm.autoencoder import build_autoencoder, downsampling, load_autoencoder
from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.likelihood import bpd_estimate
from ddpm.nonfinite import NonFiniteGuard
from ddpm.objectives import (
    LOSSES,
    OBJECTIVES,
    WEIGHTINGS,
    Denoiser,
    Prediction,
    check_min_snr_gamma,
    check_vlb,
    classifier_free_guidance,
    drop_labels,
    eps_from_output,
    min_snr_weight,
    per_sample_loss,
    split_output,
    training_target,
    vb_term,
)
from ddpm.resample import check_timestep_sampler, make_timestep_sampler, uniform_timesteps
from ddpm.rng import RNGCapture
from ddpm.schedule import NoiseSchedule
from ddpm.trusted import check_node

NONFINITE = ("stop", "skip")

log = logging.getLogger(__name__)


class EMA(AveragedModel):
    """Exponential moving average of a network's weights, on `torch.optim.swa_utils`.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (the TensorFlow
    `ExponentialMovingAverage(num_updates=...)` rule), so that a run of a few thousand steps
    samples from well-averaged weights instead of from its random initialisation. The decay is
    computed from the Python step count the module passes in, so no update reads the device.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"module.ema_decay must be in [0, 1), got {decay}")
        super().__init__(model, multi_avg_fn=self._lerp, use_buffers=True)
        self.decay = decay
        self.warmup = warmup
        self._current_decay = decay
        self.module.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def _lerp(self, ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # ema <- decay * ema + (1 - decay) * current, fused over all tensors
        torch._foreach_lerp_(ema, current, 1.0 - self._current_decay)

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> None:
        self._current_decay = self.decay_at(step)
        self.update_parameters(model)


def check_lr(lr: Any) -> None:
    """A learning rate that is not a finite number > 0 (nan, -1, a word), named now: torch's
    optimizers say "Invalid learning rate" only when training starts, without the config key."""
    if lr is None:  # the optimizer's own default
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"module.optimizer.lr must be a finite number > 0, e.g. 2e-4; got {lr!r}")


def _plain(cfg: Any) -> Any:
    """Config node -> plain Python, so checkpoints hold no OmegaConf objects (weights_only)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def check_label_dropout(net: nn.Module, cond_drop_prob: float) -> None:
    """Label dropout replaces labels by the null label: a class-conditional network without
    one (a diffusers num_class_embeds import) cannot train with it."""
    if cond_drop_prob and getattr(net, "num_classes", None) and not getattr(net, "null_label", 1):
        raise ValueError(
            f"module.cond_drop_prob={cond_drop_prob} drops labels to the null label, which "
            "this network has none of (model.null_label=false, e.g. imported from a "
            "diffusers num_class_embeds model): set module.cond_drop_prob=0"
        )


class DiffusionModule(L.LightningModule):
    """Trains a denoiser on L = E_{t, x_0, ε} w(t) · ||target - net(x_t, t)||  (Ho et al. eq. 14).

    Args (all plain config, stored in every checkpoint so `load_module` can rebuild it):
        net: config of the network (`_target_` ddpm.unet.UNet and its sizes).
        schedule: config of the noise schedule (`_target_` a NoiseSchedule constructor).
        optimizer: a `_partial_` optimizer config, called with the network's parameters.
        lr_scheduler: an optional `_partial_` LR scheduler config, stepped every optimizer step.
        objective: what the network predicts: "eps" (Ho et al.), "x0", or "v" (Salimans & Ho).
        loss: "mse" or "l1" (the prediction's error), or "vlb": L_vlb alone, T times the
            bound's term of the drawn t, through the learned mean and variance (iDDPM's L_vlb;
            needs learn_sigma).
        loss_weighting: "none", or "min_snr" (Hang et al. 2023, weight min(SNR, γ) on x_0 error).
        ema_decay / ema_warmup: see `EMA`.
        cond_drop_prob: for class-conditional nets, how often a label is replaced by the null
            label during training (classifier-free guidance, Ho & Salimans 2022).
        nonfinite / nonfinite_check_every / nonfinite_max_skips: what a non-finite loss or
            gradient does, "stop" or "skip" (`ddpm.nonfinite.NonFiniteGuard`).
        channels_last: keep the network's weights and activations in NHWC (faster
            convolutions on tensor cores).
        compile: train through `nn.Module.compile` of the network (same module, same state-dict
            keys; copies and pickles of it are eager); if compiling fails (no compiler, an
            unsupported op), a warning says why and training goes on eagerly.
        learn_sigma: the network also outputs v, the reverse variance's interpolation between
            log β̃_t and log β_t, trained by L_hybrid = L_simple + vlb_weight · L_vlb with the
            mean's gradient stopped in L_vlb (Nichol & Dhariwal 2021, Sec. 3.1, λ = 0.001).
        timestep_sampler: how training draws t: "uniform", or "loss_second_moment"
            (iDDPM Sec. 3.3: p(t) ∝ √E[L_t²], losses weighted by 1/(T p(t)); `ddpm.resample`).
        nll_variance: the fixed reverse variance ("large": β, "small": β̃) of the bound
            (`val/bpd`, eval.py nll=true) for a model without learned variances.
        autoencoder: latent diffusion (Rombach et al. 2022): the path of an autoencoder
            checkpoint (`ddpm.autoencoder`) whose scaled latents the network models; its
            network and weights become part of this module, so the checkpoint is
            self-contained (the path is replaced by the network's config). Images in and out
            (`encode`, `decode`) go through it.
    """

    def __init__(
        self,
        net: dict,
        schedule: dict,
        optimizer: dict,
        lr_scheduler: dict | None = None,
        objective: str = "eps",
        loss: str = "mse",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        cond_drop_prob: float = 0.1,
        nonfinite: str = "stop",
        nonfinite_check_every: int = 1,
        nonfinite_max_skips: int = 100,
        channels_last: bool = False,
        compile: bool = False,
        learn_sigma: bool = False,
        vlb_weight: float = 0.001,
        timestep_sampler: str = "uniform",
        nll_variance: str = "large",
        autoencoder: str | dict | None = None,
    ) -> None:
        super().__init__()
        net, schedule, optimizer, lr_scheduler = map(
            _plain, (net, schedule, optimizer, lr_scheduler)
        )
        if objective not in OBJECTIVES:
            raise ValueError(f"module.objective must be one of {OBJECTIVES}, got {objective!r}")
        if loss not in (*LOSSES, "vlb"):
            raise ValueError(f"module.loss must be one of {(*LOSSES, 'vlb')}, got {loss!r}")
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(
                f"module.loss_weighting must be one of {WEIGHTINGS}, got {loss_weighting!r}"
            )
        if not 0 <= cond_drop_prob <= 1:
            raise ValueError(f"module.cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"module.nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if nonfinite_check_every < 1:
            raise ValueError(
                f"module.nonfinite_check_every must be >= 1, got {nonfinite_check_every}"
            )
        if nll_variance not in ("large", "small"):
            raise ValueError(
                f"module.nll_variance must be 'large' or 'small', got {nll_variance!r}"
            )
        check_min_snr_gamma(min_snr_gamma)
        check_vlb(loss, learn_sigma, loss_weighting, vlb_weight)
        check_timestep_sampler(timestep_sampler)
        check_lr((optimizer or {}).get("lr"))
        self.save_hyperparameters()
        # learned variances: the network's output doubles, ε (or x_0, v) then the variance v
        out_channels = {"out_channels": 2 * net.get("in_channels", 3)} if learn_sigma else {}
        self.net: nn.Module = hydra.utils.instantiate(net, **out_channels)
        check_label_dropout(self.net, cond_drop_prob)
        self.autoencoder: nn.Module | None = None
        if autoencoder:
            self._attach_autoencoder(autoencoder)
            # LDM's scale factor: latents times this have unit variance (set from the data);
            # a pixel model has none, so its checkpoints are as they were
            self.register_buffer("latent_scale", torch.tensor(1.0))
        self.schedule: NoiseSchedule = hydra.utils.instantiate(schedule)
        # its loss history (if any) is state: in the state dict, so in every checkpoint
        self.timestep_sampler = make_timestep_sampler(timestep_sampler, self.schedule.num_timesteps)
        self.ema = EMA(self.net, decay=ema_decay, warmup=ema_warmup)
        self.class_names: list[str] = []  # from the datamodule; saved in every checkpoint
        # how this model's final grid was drawn (sampler, steps, options, guidance), set by the
        # SampleGrid callback and saved in every checkpoint: sample.py's defaults
        self.sampling: dict[str, Any] = {}
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # train/loss_mean: the loss averaged over each epoch (one batch's train/loss is noisy:
        # its std over seeds is ~15x val/loss's), what a sweep's table compares
        self.epoch_loss = MeanMetric(sync_on_compute=False)
        self._compiled = bool(compile)
        if compile:  # after the EMA copy above, which stays eager
            self.net.compile()

    def _attach_autoencoder(self, autoencoder: str | dict) -> None:
        if isinstance(autoencoder, str):  # a path, at the start of training: read it once
            net, info = load_autoencoder(autoencoder)
            self.hparams["autoencoder"] = info
        else:  # the description stored in a checkpoint: the weights come with its state_dict
            net, info = build_autoencoder(autoencoder["net"]), autoencoder
        latent = net.config.latent_channels
        if self.net.in_channels != latent:
            raise ValueError(
                f"the autoencoder's latents have {latent} channels, the network takes "
                f"{self.net.in_channels}: set model.in_channels={latent}"
            )
        self.autoencoder = net.eval().requires_grad_(False)
        # frozen and in eval mode on purpose: Lightning would otherwise warn "Found N
        # module(s) in eval mode at the start of training" at every latent run
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this model produces (decoded, for a latent model)."""
        net = self.ema.module
        if self.autoencoder is None:
            return (net.in_channels, net.image_size, net.image_size)
        size = net.image_size * downsampling(self.autoencoder)
        return (self.autoencoder.config.out_channels, size, size)

    def decode(self, x: Tensor) -> Tensor:
        """What the network models -> images in [-1, 1]: the identity in pixel space, the
        autoencoder's decoder on unscaled latents in latent space."""
        if self.autoencoder is None:
            return x
        return self.autoencoder.decode(x / self.latent_scale.to(x.dtype)).sample.clamp(-1, 1)

    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> what the network models (the posterior mean, scaled)."""
        if self.autoencoder is None:
            return images
        return self.autoencoder.encode(images).latent_dist.mean * self.latent_scale.to(images.dtype)

    def configure_callbacks(self) -> list[L.Callback]:
        """The module's own callbacks, which no callbacks config can drop: the non-finite
        guard, RNG capture for exact resumes, and learning-rate logging (as `train/lr`)."""
        own: list[L.Callback] = [
            NonFiniteGuard(
                self.hparams.nonfinite,
                self.hparams.nonfinite_check_every,
                self.hparams.nonfinite_max_skips,
            ),
            RNGCapture(),
        ]
        if self.trainer.loggers:  # LearningRateMonitor refuses a Trainer without loggers
            own.append(LearningRateMonitor(logging_interval="step"))
        return own

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.class_names = list(getattr(datamodule, "class_names", None) or self.class_names)
        scale = getattr(datamodule, "latent_scale", None)
        if (scale is None) != (self.autoencoder is None):
            raise ValueError(
                "module.autoencoder and the dataset disagree: a latent DDPM needs a latent "
                "dataset and the other way round (use experiment=latent_mnist5k "
                "autoencoder=PATH, or neither)"
            )
        if scale is not None:
            self.latent_scale.fill_(scale)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = list(self.class_names)
        checkpoint["sampling"] = dict(self.sampling)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = list(checkpoint.get("class_names", []))
        self.sampling = dict(checkpoint.get("sampling") or {})

    # ---------------------------------------------------------------- objective
    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    @property
    def variance(self) -> str:
        """The reverse variance of the bound: learned, or the configured fixed one."""
        return "learned" if self.hparams.learn_sigma else self.hparams.nll_variance

    def loss_fn(
        self,
        x0: Tensor,
        y: Tensor | None,
        net: nn.Module | None = None,
        generator: torch.Generator | None = None,
        return_t: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Per-sample losses (B,) of the training objective at random t and ε (net: self.net),
        and with `return_t` the timesteps they were drawn at: x_t drawn, labels dropped for
        guidance, the error of the prediction from its target, weighted, plus L_hybrid's
        L_vlb for a learned variance, or L_vlb alone (the math in `ddpm.objectives`). In
        training, t comes from `timestep_sampler` (whose losses are reweighted by 1/(T p(t))),
        else uniform (validation compares across steps)."""
        net = net if net is not None else self.net
        hp, schedule, T = self.hparams, self.schedule, self.schedule.num_timesteps
        if self.training:
            t, weights = self.timestep_sampler.sample(x0.shape[0], x0.device, generator)
        else:
            t, weights = uniform_timesteps(T, x0.shape[0], x0.device, generator), None
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        x_t = schedule.q_sample(x0, t, noise)  # eq. 4
        if self.num_classes and y is not None and self.training and hp.cond_drop_prob:
            y = drop_labels(y, self.num_classes, hp.cond_drop_prob)
        if hp.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        output = self._forward(net, x_t, t, y if self.num_classes else None)
        prediction, v = split_output(output, hp.learn_sigma)
        if hp.loss == "vlb":  # L_vlb = T · E_t[L_t] (improved-diffusion's RESCALED_KL)
            losses = T * vb_term(hp.objective, schedule, prediction, v, x0, x_t, t)
        else:
            target = training_target(hp.objective, schedule, x0, t, noise)
            losses = per_sample_loss(hp.loss, prediction, target)
        if hp.loss_weighting == "min_snr":
            losses = losses * min_snr_weight(hp.objective, schedule.snr(t), hp.min_snr_gamma)
        if v is not None and hp.loss != "vlb":  # L_hybrid: + λ L_vlb, the mean's gradient stopped
            vb = vb_term(hp.objective, schedule, prediction.detach(), v, x0, x_t, t)
            losses = losses + hp.vlb_weight * T * vb
        if weights is not None:  # importance-sampled t: learn p(t) from the unweighted losses
            self.timestep_sampler.update(t, losses)
            losses = losses * weights  # E_p[w L_t] = E_uniform[L_t] (ddpm.resample)
        return (losses, t) if return_t else losses

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if net is not self.net or not self._compiled or not self.training:
            return net(x_t, t, y)
        try:
            return net(x_t, t, y)
        except Exception as e:  # compilation happens at the first call: fall back for good
            log.warning("torch.compile failed (%s: %s); training eagerly", type(e).__name__, e)
            self._compiled = False
            # nn.Module has no public undo of compile(): drop what its own __getstate__ drops
            vars(net).pop("_compiled_call_impl", None)
            return net(x_t, t, y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch
        losses, t = self.loss_fn(x0, y, return_t=True)
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True)
        self.epoch_loss.update(loss.detach())
        self.log("train/loss_mean", self.epoch_loss, on_step=False, on_epoch=True)
        # per quarter of t, as improved-diffusion logs it (NaN for a quarter with no sample)
        quarter = (4 * t) // self.schedule.num_timesteps
        for q in range(4):
            mask = quarter == q
            mean = (losses.detach() * mask).sum() / mask.sum()
            self.log(f"train/loss_q{q}", mean)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: checkpoint callbacks save in on_train_batch_end
        # before the module's own hook runs, so an EMA moved there would miss the saved
        # step's update and a resumed run would drift from an uninterrupted one.
        # Lightning calls this once per optimizer step (not per micro-batch under gradient
        # accumulation) and counts the step in global_step only after it returns.
        self.ema.step(self.net, self.global_step + 1)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._measure(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """train.py test=true: the validation measures on the test split, as test/..."""
        return self._measure(batch, batch_idx, "test")

    def _measure(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> Tensor:
        x0, y = batch
        # fixed t and ε per batch, so validation losses compare across steps and runs
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        loss = self.loss_fn(x0, y, net=self.ema.module, generator=gen).mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        if self.autoencoder is not None:  # the bound of 256-level pixels: not of latents
            return loss
        # the bound in bits/dim: comparable across schedules and objectives, unlike the loss
        labels = y if self.num_classes else None
        bpd = bpd_estimate(
            self.denoiser(self.ema.module, labels),
            self.schedule,
            x0,
            self.variance,
            generator=gen.manual_seed(batch_idx),
            clip_x0=True,
        )
        self.log(f"{stage}/bpd", bpd.mean(), sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(self.net.parameters())
        if self.hparams.lr_scheduler:
            scheduler = hydra.utils.instantiate(self.hparams.lr_scheduler)(optimizer)
        else:  # a constant one, so that LearningRateMonitor logs the rate under one name
            scheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    # ---------------------------------------------------------------- sampling
    def denoiser(self, net: nn.Module, labels: Tensor | None = None) -> Denoiser:
        """`denoiser(x_t, t) -> Prediction(ε, v)`: the network `net` (self.net or the EMA's),
        conditional on `labels` (B,) when given, its prediction converted to ε per `objective`
        and v its variance output (None unless learn_sigma). For the bound and for one look at
        x̂_0; samplers take `guided_denoiser`."""

        def fn(x_t: Tensor, t: Tensor) -> Prediction:
            output = net(x_t, t, labels) if labels is not None else net(x_t, t)
            prediction, v = split_output(output, self.hparams.learn_sigma)
            eps = eps_from_output(self.hparams.objective, self.schedule, prediction, x_t, t)
            return Prediction(eps, v)

        return fn

    def guided_denoiser(
        self, net: nn.Module, labels: Tensor | None = None, guidance: float = 0.0
    ) -> Denoiser:
        """`denoiser`, with classifier-free guidance w = `guidance` > 0 (which needs labels):
        the conditional and the unconditional ε of one doubled batch, combined by
        `ddpm.objectives.classifier_free_guidance`. What a sampler takes."""
        if labels is not None and not self.num_classes:
            raise ValueError("labels were given but the model is not class-conditional")
        if guidance and labels is None:
            raise ValueError("guidance needs labels (and a class-conditional model)")
        if labels is None or not guidance:
            return self.denoiser(net, labels)
        if not getattr(net, "null_label", True):
            raise ValueError(
                f"guidance={guidance} needs the null label, which this network has none of "
                "(model.null_label=false, e.g. imported from a diffusers num_class_embeds "
                "model): sample with guidance=0"
            )
        both = self.denoiser(net, torch.cat([labels, torch.full_like(labels, self.num_classes)]))

        def fn(x_t: Tensor, t: Tensor) -> Prediction:
            doubled = both(torch.cat([x_t, x_t]), torch.cat([t, t]))
            return classifier_free_guidance(doubled, guidance)

        return fn


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild the DiffusionModule saved in `path` (network, schedule, EMA) in eval mode."""
    ckpt = load_checkpoint(path, map_location)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "net" not in hparams or "schedule" not in hparams:
        raise CheckpointError(
            f"{path} was not written by ddpm's DiffusionModule (its hyper_parameters lack "
            "'net' and 'schedule')"
        )
    # load_checkpoint checked every config in it; a diffusion model's net is a network
    check_node(hparams["net"], ("network",), "hyper_parameters.net", path)
    # for sampling: eager (a compiled network would need a compiler and differ in the last bits)
    module = DiffusionModule(**{**hparams, "compile": False})
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit the model its own hyper_parameters describe: "
            f"{str(e).splitlines()[0]} ..."
        ) from e
    module.class_names = list(ckpt.get("class_names", []))
    module.sampling = dict(ckpt.get("sampling") or {})
    return module.to(map_location).eval()
