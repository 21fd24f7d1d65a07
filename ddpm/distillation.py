"""StudentModule: one stage of progressive distillation (Salimans & Ho 2022, Algorithm 2) as a
DiffusionModule whose loss is the distillation loss (the math in `ddpm.distill`).

The student starts from its teacher's EMA weights and learns to take one DDIM step of its own
N-step grid where the teacher takes two of its 2N-step grid, with the teacher's classifier-free
guidance at w folded in (Meng et al. 2023: the student takes (x, t, y) and matches the guided
teacher, so one of its steps is one network call). Everything else is DiffusionModule's: EMA,
optimizer, checkpoints, resume. Its checkpoints are ordinary DiffusionModule checkpoints
(`hyper_parameters` of DiffusionModule's signature, the teacher's network): `ddpm.load_module`
and `sample.py ckpt=...` load them, and the record of the distillation travels beside them under
checkpoint["distillation"].
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ddpm.distill import (
    alpha_sigma,
    distillation_target,
    stage_grids,
    step_times,
    teacher_two_steps,
    truncated_snr_weight,
    x0_from_output,
)
from ddpm.module import DiffusionModule, load_module
from ddpm.objectives import per_sample_loss, split_output

# the student's own arguments: not DiffusionModule's, so kept out of its hyper_parameters
STUDENT_KEYS = ("teacher", "steps", "guidance", "clip_x0", "record")


def _plain(value: Any) -> Any:
    """A config node -> plain Python (dicts and lists); anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class StudentModule(DiffusionModule):
    """A student of `steps` (N) DDIM steps distilled from the checkpoint `teacher` at 2N steps.

    Args:
        teacher: path of the teacher's checkpoint (the first stage's: the trained model; a later
            stage's: the previous student). Loaded with weights_only; the student's weights
            (network and EMA, autoencoder and latent scale of a latent model) start as its EMA's.
        steps: N, the student's steps on the trailing grid (`ddpm.distill.stage_grids`).
        guidance: the teacher's classifier-free guidance w (0: none), folded into the student.
        clip_x0: clip the teacher's x̂ to [-1, 1], as its DDIM sampler does.
        record: what the checkpoints say of the distillation (teacher, its sha256, w, stage).
        **diffusion: DiffusionModule's arguments: the teacher's own hyper_parameters (network,
            schedule, objective, ...) with the stage's optimizer, LR schedule and EMA.
    """

    def __init__(
        self,
        teacher: str,
        steps: int,
        guidance: float = 0.0,
        clip_x0: bool = True,
        record: dict | None = None,
        **diffusion: Any,
    ) -> None:
        # plain Python before Lightning collects the arguments (weights_only checkpoints)
        diffusion = {key: _plain(value) for key, value in diffusion.items()}
        record = _plain(record)
        super().__init__(**diffusion)
        for key in STUDENT_KEYS:  # the checkpoints' hyper_parameters stay DiffusionModule's
            self.hparams.pop(key, None)
            self._hparams_initial.pop(key, None)
        source = load_module(teacher)
        # the teacher is not a submodule: not in the student's state_dict, optimizer or EMA
        object.__setattr__(self, "teacher", source.requires_grad_(False))
        self.load_state_dict(source.state_dict())  # the EMA, autoencoder and latent scale
        self.net.load_state_dict(source.ema.module.state_dict())  # the student is its EMA
        self.class_names = list(source.class_names)
        self.steps, self.guidance, self.clip_x0 = steps, float(guidance), clip_x0
        self.record = dict(record or {})
        student, grid = stage_grids(self.schedule.num_timesteps, steps)
        self.register_buffer("student_ts", student, persistent=False)
        self.register_buffer("teacher_ts", grid, persistent=False)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.to(self.device).eval()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["distillation"] = dict(self.record)

    def teacher_x0(self, labels: Tensor | None):
        """The teacher's x̂(z, t) (B, C, H, W) at guidance w: (1 + w) x̂(z, y) - w x̂(z, ∅), the
        same combination as guided ε (Ho & Salimans 2022, eq. 6: x̂ is affine in ε at fixed
        z), clipped to [-1, 1] when its sampler clips."""
        teacher, w = self.teacher, self.guidance
        net: nn.Module = teacher.ema.module
        objective, learn_sigma = teacher.hparams.objective, teacher.hparams.learn_sigma

        def fn(z: Tensor, t: Tensor) -> Tensor:
            if labels is None or not w:
                out = net(z, t, labels) if labels is not None else net(z, t)
                x0 = x0_from_output(
                    objective, self.schedule, split_output(out, learn_sigma)[0], z, t
                )
            else:
                null = torch.full_like(labels, teacher.num_classes)
                both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([labels, null]))
                both = split_output(both, learn_sigma)[0].float()
                x0_both = x0_from_output(
                    objective, self.schedule, both, torch.cat([z, z]).float(), torch.cat([t, t])
                )
                cond, uncond = x0_both.chunk(2)
                x0 = (1 + w) * cond - w * uncond
            x0 = x0.float()
            return x0.clamp(-1, 1) if self.clip_x0 else x0

        return fn

    def loss_fn(
        self,
        x0: Tensor,
        y: Tensor | None,
        net: nn.Module | None = None,
        generator: torch.Generator | None = None,
        return_t: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Per-sample distillation losses (B,) (Algorithm 2): a student step i ~ U{0..N-1}, z_t =
        q_sample(x0, t, ε), the teacher's two DDIM steps to z_t'', the target x̃, and
        max(SNR_t, 1) · ||x̂_θ(z_t) - x̃||² (net: self.net; with `return_t` also t)."""
        net = net if net is not None else self.net
        labels = y if self.num_classes else None
        i = torch.randint(0, self.steps, (x0.shape[0],), device=x0.device, generator=generator)
        times = step_times(self.student_ts, self.teacher_ts, i)
        t = times[0]
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        z_t = self.schedule.q_sample(x0, t, noise)  # Algorithm 2, line 4
        with torch.no_grad():
            z_prev = teacher_two_steps(self.teacher_x0(labels), self.schedule, z_t.float(), times)
            x_tilde = distillation_target(
                z_t.float(),
                z_prev,
                alpha_sigma(self.schedule, t, x0.ndim),
                alpha_sigma(self.schedule, times[2], x0.ndim),
            )
        if self.hparams.channels_last:
            z_t = z_t.contiguous(memory_format=torch.channels_last)
        prediction, _ = split_output(self._forward(net, z_t, t, labels), self.hparams.learn_sigma)
        x0_hat = x0_from_output(
            self.hparams.objective, self.schedule, prediction.float(), z_t.float(), t
        )
        losses = per_sample_loss(self.hparams.loss, x0_hat, x_tilde)
        losses = losses * truncated_snr_weight(self.schedule.snr(t))  # Sec. 4
        return (losses, t) if return_t else losses
