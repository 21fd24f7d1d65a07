"""Turn a checkpoint into images.

    python sample.py ckpt=runs/quickstart/<date>/checkpoints/last.ckpt n=64 seed=0 out=samples/q

writes out/grid.png and out/images/000000.png, ... (one PNG per image) from the EMA weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ddpm.callbacks import cycle_labels, save_grid, save_png, to_uint8
from ddpm.checkpoint import load_module

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} was asked for but CUDA is not available; use device=cpu")
    return device


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix new samples with earlier ones unless told to."""
    earlier = [p for p in (out / "grid.png", out / "images") if p.exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"{out} already holds samples ({', '.join(p.name for p in earlier)}); choose another "
            "out=DIR or pass overwrite=true to replace them"
        )


def resolve_labels(spec, n: int, num_classes: int | None) -> tuple[list[int] | None, int | None]:
    """The `labels` option -> one label per image (or None) and the grid's row length."""
    if spec is None:
        return None, None
    if not num_classes:
        raise ValueError("labels= was given but the checkpoint's model is not class-conditional")
    if spec == "cycle":
        return cycle_labels(n, num_classes), num_classes
    labels = [int(v) for v in spec]
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries but n={n}; give one label per image")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside the model's classes 0..{num_classes - 1}")
    return labels, None


def sample(cfg: DictConfig) -> Path:
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ValueError(
            f"n and batch_size must be >= 1, got n={cfg.n}, batch_size={cfg.batch_size}"
        )
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    device = pick_device(cfg.device)
    module = load_module(cfg.ckpt, map_location=device)
    sampler_kwargs = OmegaConf.to_container(cfg.sampler, resolve=True)
    name = sampler_kwargs.pop("name")
    steps = cfg.steps if cfg.steps is not None else sampler_kwargs.pop("steps", None)
    sampler_kwargs.pop("steps", None)

    labels, nrow = resolve_labels(cfg.labels, cfg.n, module.num_classes)
    if cfg.images:
        (out / "images").mkdir(parents=True, exist_ok=True)
    kept: list[torch.Tensor] = []
    start_time = time.perf_counter()
    with tqdm(total=cfg.n, unit="img", desc=f"{name} {steps or 'all'} steps") as bar:
        for first in range(0, cfg.n, cfg.batch_size):
            count = min(cfg.batch_size, cfg.n - first)
            images = module.generate(
                count,
                sampler=name,
                steps=steps,
                seed=cfg.seed,
                first_index=first,
                labels=None if labels is None else labels[first : first + count],
                guidance=cfg.guidance,
                use_ema=cfg.use_ema,
                **sampler_kwargs,
            ).cpu()
            if cfg.images:
                for k, img in enumerate(to_uint8(images)):
                    save_png(img, out / "images" / f"{first + k:06d}.png")
            if cfg.grid and sum(len(x) for x in kept) < cfg.grid_max:
                kept.append(images)
            bar.update(count)
            bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - start_time):.1f}")
    if cfg.grid:
        save_grid(torch.cat(kept)[: cfg.grid_max], out / "grid.png", nrow)
    log.info("wrote %d images to %s", cfg.n, out)
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
