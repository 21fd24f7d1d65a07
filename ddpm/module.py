"""DiffusionModule: the training objective, EMA weights, optimizer and sampling entry point."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ddpm.samplers import get_sampler, image_generators, randn
from ddpm.schedule import NoiseSchedule

OBJECTIVES = ("eps", "x0", "v")
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}
WEIGHTINGS = ("none", "min_snr")


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


def _plain(cfg: Any) -> Any:
    """Config node -> plain Python, so checkpoints hold no OmegaConf objects (weights_only)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


class DiffusionModule(L.LightningModule):
    """Trains a denoiser on L = E_{t, x_0, ε} w(t) · ||target - net(x_t, t)||  (Ho et al. eq. 14).

    Args (all plain config, stored in every checkpoint so `load_module` can rebuild it):
        net: config of the network (`_target_` ddpm.unet.UNet and its sizes).
        schedule: config of the noise schedule (`_target_` a NoiseSchedule constructor).
        optimizer: a `_partial_` optimizer config, called with the network's parameters.
        lr_scheduler: an optional `_partial_` LR scheduler config, stepped every optimizer step.
        objective: what the network predicts: "eps" (Ho et al.), "x0", or "v" (Salimans & Ho).
        loss: "mse" or "l1".
        loss_weighting: "none", or "min_snr" (Hang et al. 2023, weight min(SNR, γ) on x_0 error).
        ema_decay / ema_warmup: see `EMA`.
        cond_drop_prob: for class-conditional nets, how often a label is replaced by the null
            label during training (classifier-free guidance, Ho & Salimans 2022).
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
    ) -> None:
        super().__init__()
        net, schedule, optimizer, lr_scheduler = map(
            _plain, (net, schedule, optimizer, lr_scheduler)
        )
        if objective not in OBJECTIVES:
            raise ValueError(f"module.objective must be one of {OBJECTIVES}, got {objective!r}")
        if loss not in LOSSES:
            raise ValueError(f"module.loss must be one of {sorted(LOSSES)}, got {loss!r}")
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(
                f"module.loss_weighting must be one of {WEIGHTINGS}, got {loss_weighting!r}"
            )
        if not 0 <= cond_drop_prob <= 1:
            raise ValueError(f"module.cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.save_hyperparameters()
        self.net: nn.Module = hydra.utils.instantiate(net)
        self.schedule: NoiseSchedule = hydra.utils.instantiate(schedule)
        self.ema = EMA(self.net, decay=ema_decay, warmup=ema_warmup)
        self._ema_seen_step = 0
        self.class_names: list[str] = []  # from the datamodule; saved in every checkpoint

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.class_names = list(getattr(datamodule, "class_names", None) or self.class_names)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = list(self.class_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = list(checkpoint.get("class_names", []))

    # ---------------------------------------------------------------- objective
    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    def eps_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert the network's raw prediction (per `objective`) to ε, which samplers take."""
        if self.hparams.objective == "eps":
            return out
        if self.hparams.objective == "x0":
            return self.schedule.predict_eps(x_t, t, out)
        return self.schedule.eps_from_v(x_t, t, out)

    def loss_fn(
        self,
        x0: Tensor,
        y: Tensor | None,
        net: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-sample losses (B,) of the training objective at random t and ε (net: self.net)."""
        net = net if net is not None else self.net
        B = x0.shape[0]
        T = self.schedule.num_timesteps
        t = torch.randint(0, T, (B,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)  # eq. 4
        if self.num_classes and y is not None and self.training and self.hparams.cond_drop_prob:
            drop = torch.rand(B, device=x0.device) < self.hparams.cond_drop_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        out = net(x_t, t, y if self.num_classes else None)
        target = {"eps": noise, "x0": x0, "v": None}[self.hparams.objective]
        if target is None:
            target = self.schedule.velocity(x0, t, noise)
        per_pixel = LOSSES[self.hparams.loss](out.float(), target.float(), reduction="none")
        losses = per_pixel.flatten(1).mean(1)
        if self.hparams.loss_weighting == "min_snr":
            snr = self.schedule.snr(t)
            x0_weight = snr.clamp(max=self.hparams.min_snr_gamma)
            # the same x_0-space weight, expressed for the objective's own error
            losses = (
                losses
                * {"eps": x0_weight / snr, "x0": x0_weight, "v": x0_weight / (snr + 1)}[
                    self.hparams.objective
                ]
            )
        return losses

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch
        loss = self.loss_fn(x0, y).mean()
        self.log("train/loss", loss, prog_bar=True)
        if self._trainer is not None:  # a Python float: logging it costs no device sync
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_train_start(self) -> None:
        self._ema_seen_step = self.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps, so with gradient accumulation the EMA moves
        # once per step, not per micro-batch.
        if self.global_step != self._ema_seen_step:
            self._ema_seen_step = self.global_step
            self.ema.step(self.net, self.global_step)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch
        # fixed t and ε per batch, so validation losses compare across steps and runs
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        loss = self.loss_fn(x0, y, net=self.ema.module, generator=gen).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(self.net.parameters())
        if not self.hparams.lr_scheduler:
            return optimizer
        scheduler = hydra.utils.instantiate(self.hparams.lr_scheduler)(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ---------------------------------------------------------------- sampling
    def model_fn(
        self, net: nn.Module, labels: Tensor | None = None, guidance: float = 0.0
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """`model_fn(x_t, t) -> ε` for a sampler; with labels and guidance w > 0 it returns
        (1 + w) ε(x_t, y) - w ε(x_t, ∅) (Ho & Salimans 2022, eq. 6)."""
        if labels is not None and not self.num_classes:
            raise ValueError("labels were given but the model is not class-conditional")
        if guidance and labels is None:
            raise ValueError("guidance needs labels (and a class-conditional model)")

        def fn(x_t: Tensor, t: Tensor) -> Tensor:
            if labels is None:
                return self.eps_from_output(net(x_t, t), x_t, t)
            if not guidance:
                return self.eps_from_output(net(x_t, t, labels), x_t, t)
            null = torch.full_like(labels, self.num_classes)
            out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
            eps = self.eps_from_output(out, torch.cat([x_t, x_t]), torch.cat([t, t]))
            cond, uncond = eps.chunk(2)
            return (1 + guidance) * cond - guidance * uncond

        return fn

    def _start(self, n: int, seed: int, first_index: int) -> tuple[Tensor, list[torch.Generator]]:
        """x_T of images first_index.. of `seed`, and their generators, advanced past it."""
        net = self.ema.module
        gens = image_generators(seed, first_index, n)
        shape = (n, net.in_channels, net.image_size, net.image_size)
        return randn(shape, gens, self.device), gens

    def initial_noise(self, n: int, seed: int = 0, first_index: int = 0) -> Tensor:
        """The pure noise x_T (n, C, H, W) that `generate` starts these images from."""
        return self._start(n, seed, first_index)[0]

    @torch.no_grad()
    def generate(
        self,
        n: int,
        *,
        sampler: str = "ddpm",
        steps: int | None = None,
        seed: int = 0,
        first_index: int = 0,
        labels: Sequence[int] | Tensor | None = None,
        guidance: float = 0.0,
        use_ema: bool = True,
        callback: Callable[..., None] | None = None,
        **sampler_kwargs: Any,
    ) -> Tensor:
        """Draw n images (n, C, H, W) in [-1, 1]; image k uses the noise of (seed, first_index + k).

        `labels` (n,) for class-conditional models, `guidance` w as in `model_fn`.
        """
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        try:
            x_T, gens = self._start(n, seed, first_index)
            y = None if labels is None else torch.as_tensor(labels, device=self.device).long()
            return get_sampler(sampler)(
                self.model_fn(net, y, guidance),
                self.schedule,
                x_T,
                steps,
                generator=gens,
                callback=callback,
                **sampler_kwargs,
            ).clamp(-1, 1)
        finally:
            net.train(was_training)
