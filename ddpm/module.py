"""DiffusionModule: the training objective, EMA weights, optimizer and sampling entry point."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import hydra
import lightning as L
import numpy as np
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
NONFINITE = ("stop", "skip")

log = logging.getLogger(__name__)


class DivergenceError(FloatingPointError):
    """The loss or a gradient stopped being finite."""


def rng_state() -> dict[str, Any]:
    """Every RNG that training draws from, as plain data (tensors, ints) for weights_only."""
    numpy = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy[0], torch.from_numpy(numpy[1].astype(np.int64)), *numpy[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
        nonfinite: what a non-finite loss or gradient does: "stop" raises DivergenceError
            naming the step (checked every `nonfinite_check_every` steps without a device sync
            in between, and always before a checkpoint is written, so none holds a diverged
            state); "skip" drops that batch's update and goes on (one device sync per step),
            until `nonfinite_max_skips` batches in a row were dropped.
        channels_last: keep the network's weights and activations in NHWC (faster
            convolutions on tensor cores).
        compile: train through `torch.compile(net)`; if compiling fails (no compiler, an
            unsupported op), a warning says why and training goes on eagerly.
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
        if nonfinite not in NONFINITE:
            raise ValueError(f"module.nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if nonfinite_check_every < 1:
            raise ValueError(
                f"module.nonfinite_check_every must be >= 1, got {nonfinite_check_every}"
            )
        self.save_hyperparameters()
        self.net: nn.Module = hydra.utils.instantiate(net)
        self.schedule: NoiseSchedule = hydra.utils.instantiate(schedule)
        self.ema = EMA(self.net, decay=ema_decay, warmup=ema_warmup)
        self.class_names: list[str] = []  # from the datamodule; saved in every checkpoint
        # how this model's final grid was drawn (sampler, steps, options, guidance), set by the
        # SampleGrid callback and saved in every checkpoint: sample.py's defaults
        self.sampling: dict[str, Any] = {}
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # the compiled view of self.net used for training steps (same parameters, same state
        # dict); a plain list so it isn't registered as a second copy of the network
        self._compiled: list[nn.Module] = [torch.compile(self.net)] if compile else []
        self._first_bad: Tensor | None = None  # step of the first non-finite loss/grad, or -1
        self.skipped_steps = 0
        self._skips_in_a_row = 0

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.class_names = list(getattr(datamodule, "class_names", None) or self.class_names)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # never write a diverged state over a good one
        checkpoint["class_names"] = list(self.class_names)
        checkpoint["sampling"] = dict(self.sampling)
        # every rank's RNG (each draws its own noise), so a resumed run draws what this one
        # would have; Lightning itself keeps none of them
        states = [rng_state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, rng_state())
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = list(checkpoint.get("class_names", []))
        self.sampling = dict(checkpoint.get("sampling") or {})
        # applied in on_train_start, right before the first batch: whatever draws from the
        # RNGs while Lightning sets up (after this hook) must not shift the streams
        self._rng_to_restore = (checkpoint.get("rng_states"), checkpoint.get("global_step", 0))

    def on_train_start(self) -> None:
        states, step = getattr(self, "_rng_to_restore", None) or (None, 0)
        self._rng_to_restore = None
        if not states:
            return
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank < len(states):
            set_rng_state(states[rank])
        else:  # more ranks than saved: a distinct, reproducible stream per new rank
            torch.manual_seed(int(step) * 1_000_003 + rank)

    # ---------------------------------------------------------------- divergence
    def _note_finite(self, finite: Tensor) -> None:
        """Remember the first step at which `finite` was False, on the device (no sync)."""
        if self._first_bad is None or self._first_bad.device != finite.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        first = (~finite) & (self._first_bad < 0)
        # the step being computed is number global_step + 1 (checkpoint step_N follows it)
        self._first_bad = torch.where(first, self.global_step + 1, self._first_bad)

    def check_finite(self) -> None:
        """Raise DivergenceError if a non-finite loss or gradient was seen (one device sync)."""
        if self._first_bad is None or self.hparams.nonfinite != "stop":
            return
        step = int(self._first_bad)
        if step >= 0:
            raise DivergenceError(
                f"the loss or a gradient became non-finite at step {step}: training stopped and "
                "no checkpoint was written after it, so the last good one is intact. Rerun to "
                "resume from it with a smaller trainer.gradient_clip_val or module.nonfinite=skip "
                "(which drops such updates), or start again with a lower module.optimizer.lr "
                "(a resumed run keeps the checkpoint's)"
            )

    def _skip(self, what: str) -> None:
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        log.warning("step %d: non-finite %s, update skipped", self.global_step + 1, what)
        if self._skips_in_a_row >= self.hparams.nonfinite_max_skips:
            raise DivergenceError(
                f"{self._skips_in_a_row} updates in a row had a non-finite {what} (at step "
                f"{self.global_step + 1}); the run has diverged: resume from an earlier "
                "checkpoint (resume=PATH) with a smaller trainer.gradient_clip_val, or start "
                "again with a lower module.optimizer.lr"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        precision = str(self._trainer.precision) if self._trainer is not None else ""
        if "16-mixed" in precision and "bf16" not in precision:
            return  # fp16's GradScaler finds and skips inf gradients itself
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if not grads:
            return
        finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()
        if self.hparams.nonfinite == "stop":
            self._note_finite(finite)
        elif not finite:  # skip: one sync per step
            for p in self.net.parameters():
                p.grad = None  # the optimizer leaves parameters without a gradient alone
            self._skip("gradient")
        else:
            self._skips_in_a_row = 0

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
        return_t: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Per-sample losses (B,) of the training objective at random t and ε (net: self.net),
        and with `return_t` the timesteps they were drawn at."""
        net = net if net is not None else self.net
        B = x0.shape[0]
        T = self.schedule.num_timesteps
        t = torch.randint(0, T, (B,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)  # eq. 4
        if self.num_classes and y is not None and self.training and self.hparams.cond_drop_prob:
            drop = torch.rand(B, device=x0.device) < self.hparams.cond_drop_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        if self.hparams.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        out = self._forward(net, x_t, t, y if self.num_classes else None)
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
        return (losses, t) if return_t else losses

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if net is not self.net or not self._compiled or not self.training:
            return net(x_t, t, y)
        try:
            return self._compiled[0](x_t, t, y)
        except Exception as e:  # compilation happens at the first call: fall back for good
            log.warning("torch.compile failed (%s: %s); training eagerly", type(e).__name__, e)
            self._compiled = []
            return net(x_t, t, y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x0, y = batch
        losses, t = self.loss_fn(x0, y, return_t=True)
        loss = losses.mean()
        if self.hparams.nonfinite == "skip":
            if not torch.isfinite(loss):  # returning None: Lightning skips backward and step
                self._skip("loss")
                return None
        else:
            self._note_finite(torch.isfinite(loss.detach()))
        self.log("train/loss", loss, prog_bar=True)
        # per quarter of t, as improved-diffusion logs it (NaN for a quarter with no sample)
        quarter = (4 * t) // self.schedule.num_timesteps
        for q in range(4):
            mask = quarter == q
            mean = (losses.detach() * mask).sum() / mask.sum()
            self.log(f"train/loss_q{q}", mean)
        if self._trainer is not None:  # a Python float: logging it costs no device sync
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: checkpoint callbacks save in on_train_batch_end
        # before the module's own hook runs, so an EMA moved there would miss the saved
        # step's update and a resumed run would drift from an uninterrupted one.
        # Lightning calls this once per optimizer step (not per micro-batch under gradient
        # accumulation) and counts the step in global_step only after it returns.
        self.ema.step(self.net, self.global_step + 1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % self.hparams.nonfinite_check_every == 0:
            self.check_finite()

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
