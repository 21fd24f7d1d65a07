"""Train a diffusion model: compose the config, instantiate everything from it, fit.

    python train.py                                  # the quickstart (MNIST digits, CPU)
    python train.py schedule=cosine trainer.max_steps=10000
    python train.py debug=fast                       # a few steps of everything
    python train.py ckpt_path=runs/quickstart/<date>/checkpoints/last.ckpt   # resume
    python train.py --cfg job                        # print the composed config

Each run writes to runs/<name>/<date_time>/: config.yaml (resolved), checkpoints/ (last.ckpt and
every N steps), samples/ (grids during training and final.png), loss_curve.png, logs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured module on the configured data; returns the final logged metrics."""
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)

    if cfg.ckpt_path:  # fail before building anything if the checkpoint is missing or unsafe
        load_checkpoint(cfg.ckpt_path)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.dataset)
    module: L.LightningModule = hydra.utils.instantiate(cfg.module)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )

    log.info("run directory: %s", out)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("finished at step %d: %s", trainer.global_step, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # the value a Hydra sweeper (e.g. Optuna) minimises
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
