"""The first stage of a latent DDPM (Rombach et al. 2022): a KL-regularised autoencoder, trained
by the same framework (`python train.py experiment=autoencoder_mnist5k`).

The network is diffusers' `AutoencoderKL` (LDM's architecture: downsampling factor
f = 2^(len(block_out_channels) - 1), `latent_channels` c), so a pretrained one, e.g. Stable
Diffusion's VAE in a local folder, loads with `AutoencoderKL.from_pretrained(folder)` for
users who have it. The loss is a reconstruction term plus β · KL to N(0, I) per latent
dimension; LDM's perceptual and adversarial terms need weights this machine cannot download,
so they are not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ddpm.checkpoint import CheckpointError, load_checkpoint

RECONSTRUCTION = {"mse": F.mse_loss, "l1": F.l1_loss}


def build_autoencoder(net: dict) -> nn.Module:
    """The autoencoder network of a config ({_target_: diffusers.AutoencoderKL, ...})."""
    return hydra.utils.instantiate(net)


def downsampling(net: nn.Module) -> int:
    """The autoencoder's spatial factor f (an image of H px has latents of H / f px)."""
    return 2 ** (len(net.config.block_out_channels) - 1)


class AutoencoderModule(L.LightningModule):
    """Trains `net` (an `AutoencoderKL`) on rec(x, decode(z)) + kl_weight · KL(q(z|x) ‖ N(0, I)),
    z sampled from the encoder's posterior; the KL is averaged over latent dimensions and the
    reconstruction over pixels. Validation logs val/recon_mse, val/psnr (dB, images in
    [-1, 1]), val/latent_mean and val/latent_std (of the posterior means)."""

    def __init__(
        self,
        net: dict,
        optimizer: dict,
        loss: str = "l1",
        kl_weight: float = 1e-4,
    ) -> None:
        super().__init__()
        net, optimizer = (
            OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c
            for c in (net, optimizer)
        )
        if loss not in RECONSTRUCTION:
            raise ValueError(f"module.loss must be one of {sorted(RECONSTRUCTION)}, got {loss!r}")
        if kl_weight < 0:
            raise ValueError(f"module.kl_weight must be >= 0, got {kl_weight}")
        self.save_hyperparameters()
        self.net = build_autoencoder(net)
        self.class_names: list[str] = []

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, Any]:
        posterior = self.net.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        return self.net.decode(z).sample, posterior

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        recon, posterior = self(x)
        reconstruction = RECONSTRUCTION[self.hparams.loss](recon.float(), x.float())
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return {
            "loss": reconstruction + self.hparams.kl_weight * kl,
            "reconstruction": reconstruction,
            "kl": kl,
        }

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        parts = self.losses(batch[0])
        self.log("train/loss", parts["loss"], prog_bar=True)
        self.log("train/reconstruction", parts["reconstruction"])
        self.log("train/kl", parts["kl"])
        return parts["loss"]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = batch[0]
        recon, posterior = self(x, sample=False)
        mse = F.mse_loss(recon.float().clamp(-1, 1), x.float())
        self.log("val/recon_mse", mse, prog_bar=True, sync_dist=True)
        self.log("val/psnr", 10 * torch.log10(4.0 / mse), sync_dist=True)  # peak-to-peak 2
        self.log("val/latent_mean", posterior.mean.float().mean(), sync_dist=True)
        self.log("val/latent_std", posterior.mean.float().std(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return hydra.utils.instantiate(self.hparams.optimizer)(self.net.parameters())

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.class_names = list(getattr(datamodule, "class_names", None) or [])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = list(self.class_names)
        checkpoint["autoencoder"] = {"image_size": self._image_size}

    @property
    def _image_size(self) -> int | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        return getattr(datamodule, "image_size", None)


def load_autoencoder(path: str | Path) -> tuple[nn.Module, dict]:
    """The autoencoder network of a checkpoint written by `AutoencoderModule` (frozen, eval
    mode) and a description {net, image_size, source} that rebuilds it without the file."""
    ckpt = load_checkpoint(path, "cpu")
    hparams = ckpt.get("hyper_parameters") or {}
    if "net" not in hparams or "kl_weight" not in hparams:
        raise CheckpointError(
            f"autoencoder={path} is not an autoencoder checkpoint (train one with "
            "python train.py experiment=autoencoder_mnist5k, then give its last.ckpt)"
        )
    net = build_autoencoder(hparams["net"])
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its own config: {e}") from e
    info = {
        "net": hparams["net"],
        "image_size": (ckpt.get("autoencoder") or {}).get("image_size"),
        "source": str(path),
    }
    return net.eval().requires_grad_(False), info
