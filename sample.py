"""Turn a checkpoint into images.

    python sample.py ckpt=runs/quickstart/<date>/checkpoints/last.ckpt n=64 seed=0 out=samples/q
    python sample.py ckpt=... sampler=ddim steps=50 n=50000 batch_size=500 npz=true out=samples/c
    python sample.py ckpt=... labels=cycle guidance=2 animate=true noise_levels=true
    python sample.py ckpt=<emnist letters> text="HELLO WORLD" guidance=2 animate=true

writes out/grid.png, out/images/000000.png ... (one PNG per image) and, when asked, out/samples.npz
(uint8 NHWC, as OpenAI's and EDM's evaluators read), out/animation.gif, out/noise_levels.png,
out/text.png, all from the EMA weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from ddpm.callbacks import cycle_labels, save_grid, save_png, to_uint8
from ddpm.checkpoint import load_module
from ddpm.device import autocast, pick_device
from ddpm.render import (
    Recorder,
    letter_labels,
    noise_levels_figure,
    save_animation,
    sentence,
    to_pil,
    wrap_words,
)
from ddpm.samplers import sampler_settings

log = logging.getLogger(__name__)


def finished_images(out: Path, overwrite: bool, resume: bool) -> int:
    """How many images out/ already holds (0..k-1) to continue from; refuses to mix otherwise."""
    earlier = [p for p in (out / "grid.png", out / "images", out / "text.png") if p.exists()]
    if not earlier or overwrite:
        return 0
    if not resume:
        raise FileExistsError(
            f"{out} already holds samples ({', '.join(p.name for p in earlier)}); choose another "
            "out=DIR, pass resume=true to continue an interrupted run, or overwrite=true"
        )
    k = 0
    while (out / "images" / f"{k:06d}.png").is_file():
        k += 1
    return k


def check_shape(module, cfg: DictConfig) -> None:
    """Refuse a checkpoint of another image size or channel count than the one asked for."""
    net = module.ema.module
    trained = (net.in_channels, net.image_size)
    asked = (cfg.channels or net.in_channels, cfg.image_size or net.image_size)
    if asked != trained:
        raise ValueError(
            f"{cfg.ckpt} was trained on {trained[0]}x{trained[1]}x{trained[1]} images, not "
            f"{asked[0]}x{asked[1]}x{asked[1]} as asked (image_size / channels); use a checkpoint "
            "trained at that size or drop the option"
        )


def sampling(cfg: DictConfig, module) -> tuple[dict, float]:
    """generate()'s sampler arguments and the guidance w: by default (sampler=checkpoint,
    guidance=null) those the checkpoint's final training grid was drawn with, so that
    `sample.py ckpt=...` alone draws what training showed; DDPM over all T steps and no
    guidance for a checkpoint that has none. `steps=`, `guidance=` and sampler options
    (`+sampler.variance=large`) override either way."""
    saved = dict(module.sampling)
    saved_guidance = float(saved.pop("guidance", 0.0) or 0.0)
    config = OmegaConf.to_container(cfg.sampler, resolve=True)
    if config["name"] == "checkpoint":
        del config["name"]
        config = {"name": saved.pop("sampler", "ddpm"), **saved, **config}
    sampler = sampler_settings(config, cfg.steps)
    sampler["use_ema"] = cfg.use_ema
    guidance = saved_guidance if cfg.guidance is None else float(cfg.guidance)
    return sampler, guidance


def resolve_labels(cfg: DictConfig, n: int, module) -> tuple[list[int] | None, int | None]:
    """labels / class_name options -> one label per image (or None) and the grid's row length."""
    num_classes, names = module.num_classes, module.class_names
    spec = cfg.labels
    if cfg.class_name is not None:
        name = str(cfg.class_name)  # the command line makes class_name=7 an int
        if name not in names:
            raise ValueError(f"class_name={name!r} is not one of the model's classes {names}")
        spec = [names.index(name)] * n
    if spec == "auto":  # a class-conditional model draws one class per grid column
        spec = "cycle" if num_classes else None
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


def write_text(cfg: DictConfig, module, out: Path, sampler: dict, guidance: float) -> Path:
    """text="...": each letter drawn by a letters model, laid out as wrapped lines."""
    if not module.num_classes or not module.class_names:
        raise ValueError(
            "text= needs a class-conditional model trained on letters (dataset=emnist)"
        )
    lines = wrap_words(cfg.text, cfg.text_width)
    labels = letter_labels(lines, module.class_names)
    recorder = Recorder(sampler["steps"] or module.schedule.num_timesteps) if cfg.animate else None
    images = module.generate(
        len(labels),
        seed=cfg.seed,
        labels=labels,
        guidance=guidance,
        callback=recorder,
        **sampler,
    )
    out.mkdir(parents=True, exist_ok=True)

    def layout(letters: torch.Tensor) -> Image.Image:
        page = sentence(letters, lines)
        return to_pil(page[None], nrow=1, scale=cfg.scale, padding=0)

    layout(to_uint8(images.cpu())).save(out / "text.png")
    if recorder is not None:
        x_T = module.initial_noise(len(labels), cfg.seed).cpu()
        save_animation(recorder, out / "animation.gif", layout, x_T)
    log.info("wrote %s", out / "text.png")
    return out


def sample(cfg: DictConfig) -> Path:
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ValueError(
            f"n and batch_size must be >= 1, got n={cfg.n}, batch_size={cfg.batch_size}"
        )
    out = Path(cfg.out)
    start = finished_images(out, cfg.overwrite, cfg.resume)
    device = pick_device(cfg.device)
    precision = autocast(cfg.precision, device)  # a wrong value fails before any work
    module = load_module(cfg.ckpt, map_location=device)
    check_shape(module, cfg)
    if cfg.guidance and not module.num_classes:
        raise ValueError(
            f"guidance={cfg.guidance} needs a class-conditional model, and {cfg.ckpt} is "
            "unconditional (trained with model.num_classes=null); drop guidance="
        )
    sampler, guidance = sampling(cfg, module)
    if cfg.text:
        with precision:
            return write_text(cfg, module, out, sampler, guidance)

    labels, nrow = resolve_labels(cfg, cfg.n, module)
    if labels is None and cfg.guidance is None:
        guidance = 0.0  # unconditional samples of a conditional model: nothing to guide towards
    (out / "images").mkdir(parents=True, exist_ok=True)
    kept = [load_png(out / "images" / f"{k:06d}.png") for k in range(start)]
    recorder = Recorder(sampler["steps"] or module.schedule.num_timesteps) if cfg.animate else None
    row = nrow or max(1, int(min(cfg.batch_size, cfg.n - start) ** 0.5))

    def frame(images: torch.Tensor) -> Image.Image:
        return to_pil(images, row, cfg.scale)

    start_time = time.perf_counter()
    with tqdm(total=cfg.n, initial=start, unit="img", desc=f"{sampler['sampler']}") as bar:
        for first in range(start, cfg.n, cfg.batch_size):
            count = min(cfg.batch_size, cfg.n - first)
            batch_labels = None if labels is None else labels[first : first + count]
            animate = recorder is not None and first == start  # the first batch is animated
            with precision:
                images = module.generate(
                    count,
                    seed=cfg.seed,
                    first_index=first,
                    labels=batch_labels,
                    guidance=guidance,
                    callback=recorder if animate else None,
                    **sampler,
                ).float()
            images = to_uint8(images.cpu())
            for k, img in enumerate(images):  # written as they come: an interrupted run resumes
                save_png(img, out / "images" / f"{first + k:06d}.png")
            kept.append(images)
            if animate:
                x_T = module.initial_noise(count, cfg.seed, first).cpu()
                save_animation(recorder, out / "animation.gif", frame, x_T)
            bar.update(count)
            bar.set_postfix(img_per_s=f"{(bar.n - start) / (time.perf_counter() - start_time):.1f}")
    everything = torch.cat(kept)
    save_grid(everything[: cfg.grid_max].float() / 127.5 - 1, out / "grid.png", nrow)
    if cfg.npz:
        np.savez(out / "samples.npz", arr_0=everything.permute(0, 2, 3, 1).numpy())
    if cfg.noise_levels:
        first_label = None if labels is None else torch.tensor(labels[:1])
        figure = noise_levels_figure(
            module,
            everything[:1].float() / 127.5 - 1,
            list(cfg.noise_levels_t),
            cfg.seed,
            first_label,
        )
        figure.save(out / "noise_levels.png")
    log.info("wrote %d images to %s", cfg.n, out)
    return out


def load_png(path: Path) -> torch.Tensor:
    """(1, C, H, W) uint8 from a PNG written by this script."""
    array = np.asarray(Image.open(path))
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())[None]


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
