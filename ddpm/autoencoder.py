"""The first stage of a latent DDPM (Rombach et al. 2022): a KL-regularised autoencoder, trained
by the same framework (`python train.py experiment=autoencoder_mnist5k`).

The network is diffusers' `AutoencoderKL` (LDM's architecture: downsampling factor
f = 2^(len(block_out_channels) - 1), `latent_channels` c), so a pretrained one, e.g. Stable
Diffusion's VAE in a local folder, loads with `AutoencoderKL.from_pretrained(folder)` for
users who have it, and `python -m ddpm.autoencoder FOLDER OUT.ckpt` wraps it into an
autoencoder checkpoint that `autoencoder=OUT.ckpt` takes like a trained one. The loss is a
reconstruction term plus β · KL to N(0, I) per latent dimension; LDM's perceptual and
adversarial terms need weights this machine cannot download, so they are not here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.trusted import UntrustedFile, check_node

RECONSTRUCTION = {"mse": F.mse_loss, "l1": F.l1_loss}


def build_autoencoder(net: dict) -> nn.Module:
    """The autoencoder network of a config ({_target_: diffusers.AutoencoderKL, ...})."""
    return hydra.utils.instantiate(net)


def autoencoder_file_problem(path: str | Path) -> str | None:
    """Why `autoencoder=path` names no checkpoint file (None when it is one): a directory
    is named as such, with the file in it to give (a run directory's last.ckpt)."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        found = [p for p in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if p.is_file()]
        found = found or sorted(path.glob("*.ckpt"))[:3] or sorted(path.glob("*/*.ckpt"))[:3]
        hint = f"e.g. autoencoder={found[0]}" if found else "it holds no .ckpt"
        return (
            f"autoencoder={path} is a directory; give the checkpoint file of an "
            f"experiment=autoencoder_mnist5k run ({hint})"
        )
    return (
        f"autoencoder={path}: no such file; give the last.ckpt of an "
        "experiment=autoencoder_mnist5k run"
    )


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
    problem = autoencoder_file_problem(path)
    if problem:
        raise CheckpointError(problem)
    ckpt = load_checkpoint(path, "cpu")
    hparams = ckpt.get("hyper_parameters") or {}
    if "net" not in hparams or "kl_weight" not in hparams:
        raise CheckpointError(
            f"autoencoder={path} is not an autoencoder checkpoint (train one with "
            "python train.py experiment=autoencoder_mnist5k, then give its last.ckpt)"
        )
    # load_checkpoint checked every config in it; an autoencoder's net is an autoencoder
    check_node(hparams["net"], ("autoencoder",), "hyper_parameters.net", path)
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


def wrap_pretrained(folder: str | Path, out: str | Path, image_size: int | None = None) -> Path:
    """An `AutoencoderKL` saved with diffusers' `save_pretrained` (e.g. Stable Diffusion's VAE
    folder, `config.json` + weights) as an autoencoder checkpoint of this project: its config
    as `hyper_parameters.net`, its weights as `net.*`, loadable with `weights_only=True`.
    The latent DDPM computes its own scale factor from the data (LDM's recipe), so the
    folder's `scaling_factor` is not used."""
    from diffusers import AutoencoderKL

    folder, out = Path(folder), Path(out)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: give the folder diffusers' save_pretrained wrote "
            "(for Stable Diffusion's VAE, the vae/ subfolder of the pipeline)"
        )
    if out.exists():
        raise FileExistsError(f"{out} exists: give another output path")
    # a stranger's config.json becomes a config this project rebuilds: refused before use
    raw = json.loads((folder / "config.json").read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{folder / 'config.json'} is not a JSON object of AutoencoderKL options")
    plain = {k: v for k, v in raw.items() if not k.startswith("_")}
    check_node(
        {"_target_": "diffusers.AutoencoderKL", **plain}, ("autoencoder",), "config.json", folder
    )
    net = AutoencoderKL.from_pretrained(folder)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in net.config.items()}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    hparams = {
        "net": {"_target_": "diffusers.AutoencoderKL", **config},
        "optimizer": None,
        "loss": None,
        "kl_weight": None,  # not trained here
    }
    check_node(hparams["net"], ("autoencoder",), "config.json", folder)  # as diffusers read it
    ckpt = {
        "hyper_parameters": hparams,
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        # a size only when given: the network is convolutional, and its sample_size (e.g. 512)
        # need not be the size of the data the DDPM is trained on
        "autoencoder": {"image_size": image_size},
        "class_names": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.autoencoder",
        description="Wrap a pretrained diffusers AutoencoderKL folder into an autoencoder "
        "checkpoint for train.py autoencoder=OUT.ckpt",
    )
    parser.add_argument("folder", help="folder written by AutoencoderKL.save_pretrained")
    parser.add_argument("out", help="the checkpoint to write (.ckpt)")
    parser.add_argument("--image-size", type=int, help="image size it is used at (px)")
    args = parser.parse_args(argv)
    try:
        path = wrap_pretrained(args.folder, args.out, args.image_size)
    except (FileNotFoundError, FileExistsError, OSError, ValueError, UntrustedFile) as e:
        parser.error(str(e))
    print(f"wrote {path}: train.py experiment=... autoencoder={path}")


if __name__ == "__main__":
    main()
