"""The guard against a diverged run: a NaN or infinite loss or gradient stops the run
(`nonfinite=stop`, `DivergenceError`) or skips that update (`skip`, up to a limit) before any
checkpoint holds the diverged weights. One of the DiffusionModule's own callbacks
(`configure_callbacks`), so no callbacks config drops it."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class DivergenceError(FloatingPointError):
    """The loss or a gradient stopped being finite."""


class NonFiniteGuard(L.Callback):
    """What a non-finite loss or gradient does (`module.nonfinite`).

    "stop": raise DivergenceError naming the first bad step; checked every `check_every` steps
    without a device sync in between, and always before a checkpoint is written, so none holds
    a diverged state. "skip": drop the optimizer step (all its gradients; under gradient
    accumulation the whole accumulated step) and go on, one device sync per step, until
    `max_skips` steps in a row were dropped. Under fp16 the GradScaler drops steps with
    non-finite gradients itself; a non-finite loss is still counted here.
    """

    def __init__(self, mode: str = "stop", check_every: int = 1, max_skips: int = 100) -> None:
        self.mode, self.check_every, self.max_skips = mode, check_every, max_skips
        self.first_bad: Tensor | None = None  # step of the first non-finite loss/grad, or -1
        self.loss_finite: Tensor | None = None  # this step's loss (skip mode)
        self.skipped_steps = 0
        self.skips_in_a_row = 0

    def note(self, finite: Tensor, step: int) -> None:
        """Remember the first step at which `finite` was False, on the device (no sync)."""
        if self.first_bad is None or self.first_bad.device != finite.device:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        first = (~finite) & (self.first_bad < 0)
        self.first_bad = torch.where(first, step, self.first_bad)

    def check(self) -> None:
        """Raise DivergenceError if a non-finite loss or gradient was seen (one device sync)."""
        if self.first_bad is None or self.mode != "stop":
            return
        step = int(self.first_bad)
        if step >= 0:
            raise DivergenceError(
                f"the loss or a gradient became non-finite at step {step}: training stopped and "
                "no checkpoint was written after it, so the last good one is intact. Rerun to "
                "resume from it with a smaller trainer.gradient_clip_val or module.nonfinite=skip "
                "(which drops such updates), or start again with a lower module.optimizer.lr "
                "(a resumed run keeps the checkpoint's)"
            )

    def on_before_backward(self, trainer: L.Trainer, module: Any, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        if self.mode == "stop":
            # the step being computed is number global_step + 1 (checkpoint step_N follows it)
            self.note(finite, trainer.global_step + 1)
        else:  # every micro-batch of an accumulated step counts
            self.loss_finite = finite if self.loss_finite is None else self.loss_finite & finite

    def on_before_optimizer_step(self, trainer: L.Trainer, module: Any, optimizer: Any) -> None:
        loss_finite = True if self.loss_finite is None else bool(self.loss_finite)
        self.loss_finite = None
        precision = str(trainer.precision)
        fp16 = "16-mixed" in precision and "bf16" not in precision
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if fp16 or not grads:  # fp16's GradScaler finds and skips inf gradients itself
            finite = None
        else:
            finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()
        if self.mode == "stop":
            if finite is not None:
                self.note(finite, trainer.global_step + 1)
            return
        if loss_finite and (finite is None or bool(finite)):  # skip mode: one sync per step
            self.skips_in_a_row = 0
            return
        for p in params:
            p.grad = None  # the optimizer leaves parameters without a gradient alone
        self.skipped_steps += 1
        self.skips_in_a_row += 1
        what = "gradient" if loss_finite else "loss"
        log.warning("step %d: non-finite %s, update skipped", trainer.global_step + 1, what)
        if self.skips_in_a_row >= self.max_skips:
            raise DivergenceError(
                f"{self.skips_in_a_row} updates in a row had a non-finite {what} (at step "
                f"{trainer.global_step + 1}); the run has diverged: resume from an earlier "
                "checkpoint (resume=PATH) with a smaller trainer.gradient_clip_val, or start "
                "again with a lower module.optimizer.lr"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.global_step % self.check_every == 0:
            self.check()

    def on_save_checkpoint(self, trainer: L.Trainer, module: Any, checkpoint: dict) -> None:
        self.check()  # never write a diverged state over a good one
