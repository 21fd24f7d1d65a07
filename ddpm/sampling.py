"""What `sample.py` does: a checkpoint's EMA model -> grid.png, one PNG per image, and when
asked samples.npz, animation.gif, noise_levels.png, text.png (see sample.py for the options)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from ddpm.device import autocast, pick_device
from ddpm.files import FULL, DiskFull, atomic_write, check_output_dir
from ddpm.folder import load_image
from ddpm.generate import denoised, first_frame, generate, generate_all, image_labels
from ddpm.module import load_module
from ddpm.render import (
    IMAGE_NAME,
    SETTINGS,
    Recorder,
    letter_labels,
    noise_levels_figure,
    save_animation,
    save_grid,
    save_png,
    sentence,
    to_pil,
    to_uint8,
    wrap_words,
)
from ddpm.samplers import check_guidance, check_seed, check_steps, sampler_settings
from ddpm.trusted import allow_targets

log = logging.getLogger(__name__)


OUTPUTS = ("grid.png", "samples.npz", "animation.gif", "noise_levels.png", "text.png", SETTINGS)
# temporary files of writes cut short (`atomic_write`): .000003.png.<random>.tmp
TEMP_NAME = re.compile(r"\.(\d{6}\.png|" + "|".join(map(re.escape, OUTPUTS)) + r")\..+\.tmp")


def own_files(out: Path) -> list[Path]:
    """What earlier runs of sample.py left in out/: its named outputs, its numbered images and
    the temporary files of killed writes; nothing else a user keeps there."""
    found = [out / name for name in OUTPUTS if (out / name).is_file()]
    for folder in (out, out / "images"):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if TEMP_NAME.fullmatch(p.name))
    if (out / "images").is_dir():
        found += sorted(p for p in (out / "images").iterdir() if IMAGE_NAME.fullmatch(p.name))
    return found


def check_earlier(out: Path, overwrite: bool, resume: bool) -> list[Path]:
    """Earlier outputs of sample.py in out/; refuses to mix unless resume= or overwrite= says
    what to do with them."""
    earlier = [p for p in own_files(out) if not p.name.endswith(".tmp")]
    if earlier and not overwrite and not resume:
        names = sorted({p.name if p.parent == out else "images" for p in earlier})
        raise FileExistsError(
            f"{out} already holds samples ({', '.join(names)}); choose another "
            "out=DIR, pass resume=true to continue an interrupted run, or overwrite=true"
        )
    return earlier


def settings_record(
    cfg: DictConfig, sampler: dict, guidance: float, labels: list[int] | None, nrow: int | None
) -> dict:
    """What decides the pixels of image k: a resumed run must draw with the same, or the
    folder would hold two sets (n is not among them: image k is the same whatever n)."""
    with open(cfg.ckpt, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if labels is not None and nrow is not None:
        labels = "cycle"  # one class per column, as many images as asked
    options = dict(sampler)
    return {
        "ckpt_sha256": digest,
        "seed": int(cfg.seed),
        "sampler": options.pop("sampler"),
        "steps": options.pop("steps", None),
        **{f"sampler.{k}": v for k, v in sorted(options.items())},
        "guidance": guidance,
        "labels": labels,
        "use_ema": bool(cfg.use_ema),
        "precision": str(cfg.precision),
        "text": None if cfg.text is None else str(cfg.text),
        "ckpt": str(Path(cfg.ckpt).absolute()),  # for reading only: a moved file is the same
        "n": int(cfg.n),
    }


def check_settings(out: Path, record: dict) -> None:
    """Refuse to resume images drawn with other settings than this run's (out/sample.json)."""
    path = out / SETTINGS
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileExistsError(
            f"{out} holds samples but no {SETTINGS} (the settings they were drawn with), so "
            "resume=true cannot check they match this run's; choose another out=DIR, or "
            "overwrite=true to replace them"
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not readable JSON ({e}); choose another out=DIR, or overwrite=true to "
            "replace the samples there"
        ) from None

    def same(key: str) -> bool:
        old, new = saved.get(key), record.get(key)
        if key == "labels" and isinstance(old, list) and isinstance(new, list):
            return old[: len(new)] == new[: len(old)]  # image k's label, for every common k
        return old == new

    keys = [k for k in {**saved, **record} if k not in ("ckpt", "n") and not same(k)]
    if keys:

        def short(value: object) -> str:
            text = json.dumps(value)
            return text if len(text) <= 40 else text[:37] + "..."

        diff = "; ".join(
            f"{k} {short(saved.get(k))} there, {short(record.get(k))} now" for k in keys
        )
        raise ValueError(
            f"{out} holds samples drawn with other settings ({diff}): resume=true continues "
            "only with the same settings; rerun with those, choose another out=DIR, or "
            "overwrite=true to replace them"
        )


def finished_images(out: Path, n: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The images 0..k-1 that out/images holds whole, k <= n; a file that does not decode (a
    0-byte or truncated PNG of a kill or a full disk) or has another shape ends the run of
    trusted ones: it is drawn again, with every image after it."""
    kept = []
    for k in range(n):
        path = out / "images" / f"{k:06d}.png"
        if not path.is_file():
            break
        try:
            image = load_png(path)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors of a cut or empty file
            log.warning(
                "%s is not a whole PNG (%s: %s): drawing it again, and the images after it",
                path,
                type(e).__name__,
                e,
            )
            break
        if tuple(image.shape[1:]) != shape:
            log.warning(
                "%s is %s, not the model's %s: drawing it again, and the images after it",
                path,
                "x".join(map(str, image.shape[1:])),
                "x".join(map(str, shape)),
            )
            break
        kept.append(image)
    more = sum(1 for p in own_files(out) if IMAGE_NAME.fullmatch(p.name) and int(p.stem) >= n)
    if more:
        log.info(
            "images/ holds %d images beyond n=%d, drawn with the same settings: kept; "
            "grid.png and samples.npz hold the first %d",
            more,
            n,
            n,
        )
    return kept


def check_shape(module, cfg: DictConfig) -> None:
    """Refuse a checkpoint of another image size or channel count than the one asked for."""
    channels, size, _ = module.image_shape
    trained = (channels, size)
    asked = (cfg.channels or channels, cfg.image_size or size)
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
    # 0 would run all T steps and record 0; the key is where this run's value came from
    from_group = cfg.steps is None and cfg.sampler.get("steps") is not None
    key = "sampler.steps" if from_group else "steps"
    check_steps(sampler["steps"], module.schedule.num_timesteps, key)
    guidance = saved_guidance if cfg.guidance is None else float(cfg.guidance)
    check_guidance(guidance)
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
        return image_labels("cycle", 0, n, num_classes), num_classes
    indices = isinstance(spec, Sequence) and not isinstance(spec, str)
    if not indices or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
        # int() of a word says only "invalid literal"; a class by its name is class_name=
        more = ", ..." if len(names) > 10 else ""
        known = f" (the model's: {', '.join(map(str, names[:10]))}{more})"
        raise ValueError(
            f"labels={_shown(spec)} must be class indices 0..{num_classes - 1} (e.g. "
            "labels=[3,3,7]), cycle, auto or null; for a class by its name give class_name=NAME"
            + (known if names else "")
        )
    labels = [int(v) for v in spec]
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries but n={n}; give one label per image")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside the model's classes 0..{num_classes - 1}")
    return labels, None


def _shown(value: object) -> str:
    """A labels= value as the command line wrote it: [a, b], not ['a', 'b'] or ListConfig."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return str(value)
    return "[" + ", ".join(map(str, value)) + "]"


def noise_levels_t(ts: list[int] | None, num_timesteps: int) -> list[int]:
    """The timesteps of the noise-level figure: the given ones, checked against the schedule,
    or 0, 10, 25, 50 and 75 % of T and the last, T - 1 (for T = 1000: 0, 100, 250, 500, 750,
    999)."""
    if ts is None:
        fractions = (0, 0.1, 0.25, 0.5, 0.75, 1.0)
        return [min(round(f * num_timesteps), num_timesteps - 1) for f in fractions]
    bad = [t for t in ts if not 0 <= int(t) < num_timesteps]
    if bad:
        raise ValueError(
            f"noise_levels_t {bad} are outside the model's timesteps 0..{num_timesteps - 1}; "
            "give t's within them or drop noise_levels_t (null: spread over the schedule)"
        )
    return [int(t) for t in ts]


def check_text(cfg: DictConfig, module) -> None:
    """Refuse a text= that the model cannot write, before any letter is drawn."""
    if not module.num_classes or not module.class_names:
        raise ValueError(
            "text= needs a class-conditional model trained on letters (dataset=emnist)"
        )
    if cfg.text_width < 1:
        raise ValueError(f"text_width must be >= 1 (characters per line), got {cfg.text_width}")
    # wrap_words never splits a word: a longer one would make a line (and text.png) that wide
    longest = max(str(cfg.text).split(), key=len)
    if len(longest) > cfg.text_width:
        shown = longest if len(longest) <= 20 else longest[:17] + "..."
        raise ValueError(
            f"text= holds a word of {len(longest)} letters ({shown!r}), longer than "
            f"text_width={cfg.text_width} characters per line; give text_width={len(longest)} "
            "or more, or split the word"
        )
    letter_labels(wrap_words(str(cfg.text), cfg.text_width), module.class_names)


def write_text(
    cfg: DictConfig, module, out: Path, sampler: dict, guidance: float, precision
) -> Path:
    """text="...": each letter drawn by a letters model, laid out as wrapped lines."""
    lines = wrap_words(str(cfg.text), cfg.text_width)
    labels = letter_labels(lines, module.class_names)
    recorder = Recorder(sampler["steps"] or module.schedule.num_timesteps) if cfg.animate else None
    images = generate_all(
        module,
        len(labels),
        sampler=sampler,
        seed=cfg.seed,
        labels=labels,
        guidance=guidance,
        use_ema=cfg.use_ema,
        callback=recorder,
        context=lambda: precision,
        desc="letters",
    )
    out.mkdir(parents=True, exist_ok=True)

    def layout(letters: torch.Tensor) -> Image.Image:
        page = sentence(letters, lines)
        return to_pil(page[None], nrow=1, scale=cfg.scale, padding=0)

    page = layout(to_uint8(images.cpu()))
    atomic_write(out / "text.png", lambda f: page.save(f, format="PNG"))  # a full disk: named
    if recorder is not None:
        x_T = first_frame(module, len(labels), cfg.seed)
        save_animation(recorder, out / "animation.gif", layout, x_T, hold_ms=hold_ms(cfg))
    log.info("wrote %s", out / "text.png")
    return out


def check_options(cfg: DictConfig) -> None:
    """Options that need no model, checked before it is loaded: a seed beyond 32 bits draws
    another seed's images, guidance=nan black ones, grid_max=0 an empty grid.png."""
    check_seed(cfg.seed)
    check_guidance(cfg.guidance)
    grid_max = cfg.grid_max
    if isinstance(grid_max, bool) or not isinstance(grid_max, int) or grid_max < 1:
        raise ValueError(
            "grid_max must be an integer >= 1 (grid.png shows the first grid_max images, e.g. "
            f"grid_max=256), got {grid_max!r}"
        )


def hold_ms(cfg: DictConfig) -> int:
    """How long animation.gif shows its final frame (ms)."""
    hold = cfg.get("animation_hold_ms", 2000)
    if isinstance(hold, bool) or not isinstance(hold, int) or hold < 0:
        raise ValueError(f"animation_hold_ms must be an integer >= 0 (milliseconds), got {hold!r}")
    return hold


def sample(cfg: DictConfig) -> Path:
    """sample.py: the checks, then the images (see `draw`). A full disk midway is one line
    naming the file, and how to finish the job: the images written so far are kept and
    resume=true draws only the rest."""
    try:
        return draw(cfg)
    except OSError as e:
        if e.errno not in FULL:
            raise
        line = _full_line(e, Path(cfg.out))
        raise OSError(f"{line}; then rerun with resume=true to finish the job") from None


def _full_line(e: OSError, out: Path) -> str:
    """A full disk's error in one line naming the file (`DiskFull` already does; a write
    that failed inside a library may know no file name: then the folder)."""
    if isinstance(e, DiskFull):
        return str(e)
    where = e.filename or f"into {out}"
    return f"cannot write {where}: {e.strerror}; free space or write elsewhere"


def draw(cfg: DictConfig) -> Path:
    allow_targets(cfg.get("trusted_targets"))  # the user's own classes a checkpoint may name
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ValueError(
            f"n and batch_size must be >= 1, got n={cfg.n}, batch_size={cfg.batch_size}: n is "
            "the number of images (e.g. n=64), batch_size the images per forward pass"
        )
    if cfg.text is not None and not str(cfg.text).strip():
        raise ValueError(
            f"text={str(cfg.text)!r} holds no letters; give a sentence (text='HELLO WORLD') "
            "or drop text= to draw n images"
        )
    hold_ms(cfg)  # a wrong value fails before any work
    check_options(cfg)
    out = Path(cfg.out)
    check_output_dir(out, "out")
    earlier = check_earlier(out, cfg.overwrite, cfg.resume)
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
    real = None
    if cfg.noise_levels:  # a wrong t or image fails now, not after the sampling
        noise_levels_t(cfg.noise_levels_t, module.schedule.num_timesteps)
        if cfg.noise_levels_image:
            channels, size, _ = module.image_shape
            real = load_image(cfg.noise_levels_image, size, channels, "noise_levels_image")
    labels, nrow = (None, None) if cfg.text else resolve_labels(cfg, cfg.n, module)
    if labels is None and not cfg.text:
        if cfg.guidance:
            raise ValueError(
                f"guidance={cfg.guidance} needs labels to guide towards, and labels=null draws "
                "unconditional samples; give labels=cycle (or a list, or class_name=NAME), or "
                "drop guidance="
            )
        guidance = 0.0  # unconditional samples of a conditional model: nothing to guide towards
    if cfg.text:
        check_text(cfg, module)

    # every check passed: only now is anything in out/ changed
    record = settings_record(cfg, sampler, guidance, labels, nrow)
    if earlier and cfg.resume and not cfg.overwrite:
        check_settings(out, record)
    for path in own_files(out):
        # overwrite=true: all of it; resume=true: what is made from the images (grid, npz ...)
        # is made anew for this run's n and options; always: temporary files of cut writes
        derived = path.parent == out and path.name != SETTINGS
        if cfg.overwrite or derived or path.name.endswith(".tmp"):
            path.unlink()
    atomic_write(out / SETTINGS, lambda f: f.write(json.dumps(record, indent=1).encode()))
    if cfg.text:
        return write_text(cfg, module, out, sampler, guidance, precision)

    (out / "images").mkdir(parents=True, exist_ok=True)
    kept = finished_images(out, cfg.n, module.image_shape) if cfg.resume else []
    start = len(kept)
    recorder = Recorder(sampler["steps"] or module.schedule.num_timesteps) if cfg.animate else None
    row = nrow or max(1, int(min(cfg.batch_size, cfg.n - start) ** 0.5))

    def frame(images: torch.Tensor) -> Image.Image:
        return to_pil(images, row, cfg.scale)

    batches = generate(
        module,
        cfg.n - start,
        sampler=sampler,
        seed=cfg.seed,
        first=start,
        labels=labels,
        guidance=guidance,
        batch_size=cfg.batch_size,
        use_ema=cfg.use_ema,
        callback=recorder,  # the first batch is animated
        context=lambda: precision,
    )
    for first, images in batches:
        images = to_uint8(images.cpu())
        for k, img in enumerate(images):  # written as they come: an interrupted run resumes
            save_png(img, out / "images" / f"{first + k:06d}.png")
        kept.append(images)
        if recorder is not None and first == start:
            x_T = first_frame(module, len(images), cfg.seed, first)
            save_animation(recorder, out / "animation.gif", frame, x_T, hold_ms=hold_ms(cfg))
    everything = torch.cat(kept)
    save_grid(everything[: cfg.grid_max].float() / 127.5 - 1, out / "grid.png", nrow)
    if cfg.npz:
        array = everything.permute(0, 2, 3, 1).numpy()
        atomic_write(out / "samples.npz", lambda f: np.savez(f, arr_0=array))
    if cfg.noise_levels:
        first_label = None if labels is None else torch.tensor(labels[:1])
        ts = noise_levels_t(cfg.noise_levels_t, module.schedule.num_timesteps)
        shown = everything[:1] if real is None else real  # a generated image or a real one
        x_t, x0_hat = denoised(module, shown.float() / 127.5 - 1, ts, cfg.seed, first_label)
        figure = noise_levels_figure(x_t, x0_hat, ts)
        atomic_write(out / "noise_levels.png", lambda f: figure.save(f, format="PNG"))
    log.info("wrote %d images to %s", cfg.n, out)
    return out


def load_png(path: Path) -> torch.Tensor:
    """(1, C, H, W) uint8 from a PNG written by `save_png`."""
    return pil_to_tensor(Image.open(path))[None]
